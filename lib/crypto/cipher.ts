// Block ciphers behind one small interface. AES runs in OpenSSL (ECB contexts are kept and
// reused: with padding off an ECB context carries no state between update() calls, so one
// context per key and direction serves every request). Twofish and Serpent are ours (Node's
// OpenSSL has neither).
import crypto from 'node:crypto';
import { ImgError } from '../core/errors';
import { Twofish } from './twofish';
import { Serpent } from './serpent';

export type CipherAlg = 'aes' | 'twofish' | 'serpent';
export const CIPHER_ALGS: readonly CipherAlg[] = ['aes', 'twofish', 'serpent'];

export interface BlockCipher {
  readonly alg: CipherAlg;
  readonly keyLen: number;
  /** encrypts whole 16-byte blocks independently; returns a new buffer of the same length */
  ecbEncrypt(data: Uint8Array): Buffer;
  ecbDecrypt(data: Uint8Array): Buffer;
  /** CBC encryption of one chain (e.g. a sector) with the given IV */
  cbcEncrypt(data: Uint8Array, iv: Uint8Array): Buffer;
}

/** A raw single-block primitive implemented in JS. */
export interface RawBlockCipher {
  encryptBlock(src: Uint8Array, so: number, dst: Uint8Array, d: number): void;
  decryptBlock(src: Uint8Array, so: number, dst: Uint8Array, d: number): void;
}

class AesCipher implements BlockCipher {
  readonly alg = 'aes' as const;
  private enc: crypto.Cipher;
  private dec: crypto.Decipher;
  private name: string;
  constructor(private key: Buffer) {
    this.keyLen = key.length;
    this.name = `aes-${key.length * 8}`;
    this.enc = crypto.createCipheriv(`${this.name}-ecb`, key, null).setAutoPadding(false);
    this.dec = crypto.createDecipheriv(`${this.name}-ecb`, key, null).setAutoPadding(false);
  }
  readonly keyLen: number;
  ecbEncrypt(data: Uint8Array): Buffer {
    if (data.length === 0) return Buffer.alloc(0);
    return this.enc.update(data);
  }
  ecbDecrypt(data: Uint8Array): Buffer {
    if (data.length === 0) return Buffer.alloc(0);
    // OpenSSL keeps back the last block of a decryption only when padding is on
    return this.dec.update(data);
  }
  cbcEncrypt(data: Uint8Array, iv: Uint8Array): Buffer {
    const c = crypto.createCipheriv(`${this.name}-cbc`, this.key, iv).setAutoPadding(false);
    const out = c.update(data);
    c.final();
    return out;
  }
}

class JsCipher implements BlockCipher {
  constructor(readonly alg: CipherAlg, readonly keyLen: number, private raw: RawBlockCipher) {}
  ecbEncrypt(data: Uint8Array): Buffer {
    const out = Buffer.allocUnsafe(data.length);
    for (let i = 0; i < data.length; i += 16) this.raw.encryptBlock(data, i, out, i);
    return out;
  }
  ecbDecrypt(data: Uint8Array): Buffer {
    const out = Buffer.allocUnsafe(data.length);
    for (let i = 0; i < data.length; i += 16) this.raw.decryptBlock(data, i, out, i);
    return out;
  }
  cbcEncrypt(data: Uint8Array, iv: Uint8Array): Buffer {
    const out = Buffer.allocUnsafe(data.length);
    const blk = new Uint8Array(16);
    let prev: Uint8Array = iv;
    let po = 0;
    for (let i = 0; i < data.length; i += 16) {
      for (let k = 0; k < 16; k++) blk[k] = data[i + k] ^ prev[po + k];
      this.raw.encryptBlock(blk, 0, out, i);
      prev = out;
      po = i;
    }
    return out;
  }
}

export function validKeyLen(alg: CipherAlg, len: number): boolean {
  return len === 16 || len === 24 || len === 32;
}

export function makeCipher(alg: CipherAlg, key: Uint8Array): BlockCipher {
  if (!validKeyLen(alg, key.length)) throw new ImgError('crypto', `${alg}: invalid key length ${key.length}`);
  const k = Buffer.from(key);
  switch (alg) {
    case 'aes': return new AesCipher(k);
    case 'twofish': return new JsCipher(alg, k.length, new Twofish(k));
    case 'serpent': return new JsCipher(alg, k.length, new Serpent(k));
  }
}
