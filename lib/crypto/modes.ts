// Sector encryption as dm-crypt and qemu's crypto layer do it: a cipher, a chaining mode
// (xts, cbc, ecb, ctr) and an IV generator (plain, plain64, essiv:<hash>) keyed by the sector
// number. Everything works on runs of sectors: one OpenSSL call per request, not per sector.
//   XTS: the tweaks of every sector come from one ECB call (E_K2 of the IVs), are expanded by
//   multiplication with alpha in JS, and the data goes through one ECB call between two XORs.
//   CBC decryption is parallel (one ECB call, then XOR with the previous ciphertext block).
import crypto from 'node:crypto';
import { ImgError } from '../core/errors';
import type { HostCrypt } from '../core/node';
import { BlockCipher, CipherAlg, makeCipher } from './cipher';

export type CipherMode = 'xts' | 'cbc' | 'ecb' | 'ctr';
export type IvGenAlg = 'plain' | 'plain64' | 'essiv';
export const CIPHER_MODES: readonly CipherMode[] = ['xts', 'cbc', 'ecb', 'ctr'];
export const IVGEN_ALGS: readonly IvGenAlg[] = ['plain', 'plain64', 'essiv'];
export const HASH_ALGS = ['sha1', 'sha224', 'sha256', 'sha384', 'sha512', 'ripemd160'] as const;
export type HashAlg = typeof HASH_ALGS[number];

export function hashLen(h: HashAlg): number {
  return { sha1: 20, sha224: 28, sha256: 32, sha384: 48, sha512: 64, ripemd160: 20 }[h];
}

export function isHashAlg(s: string): s is HashAlg { return (HASH_ALGS as readonly string[]).includes(s); }

export interface SectorCipherSpec {
  alg: CipherAlg;
  mode: CipherMode;
  ivgen: IvGenAlg | null; // null only for ecb
  ivHash?: HashAlg;       // essiv
}

/** Parses dm-crypt's "aes" + "xts-plain64" / "cbc-essiv:sha256" / "ecb" pair. */
export function parseCipherSpec(name: string, modeSpec: string): SectorCipherSpec {
  const alg = name.toLowerCase();
  if (alg !== 'aes' && alg !== 'twofish' && alg !== 'serpent') throw new ImgError('unsupported', `unsupported cipher '${name}'`);
  const m = /^([a-z]+)(?:-([a-z0-9]+)(?::([a-z0-9]+))?)?$/.exec(modeSpec.toLowerCase());
  if (!m) throw new ImgError('unsupported', `unsupported cipher mode '${modeSpec}'`);
  const mode = m[1];
  if (!(CIPHER_MODES as readonly string[]).includes(mode)) throw new ImgError('unsupported', `unsupported cipher mode '${modeSpec}'`);
  let ivgen: IvGenAlg | null = null;
  let ivHash: HashAlg | undefined;
  if (m[2] !== undefined) {
    if (!(IVGEN_ALGS as readonly string[]).includes(m[2])) throw new ImgError('unsupported', `unsupported IV generator '${m[2]}'`);
    ivgen = m[2] as IvGenAlg;
    if (ivgen === 'essiv') {
      if (!m[3] || !isHashAlg(m[3])) throw new ImgError('unsupported', `unsupported ESSIV hash in '${modeSpec}'`);
      ivHash = m[3];
    } else if (m[3] !== undefined) throw new ImgError('unsupported', `unsupported cipher mode '${modeSpec}'`);
  } else if (mode !== 'ecb') throw new ImgError('unsupported', `cipher mode '${modeSpec}' needs an IV generator`);
  return { alg: alg as CipherAlg, mode: mode as CipherMode, ivgen, ivHash };
}

export function modeString(s: SectorCipherSpec): string {
  if (!s.ivgen) return s.mode;
  return `${s.mode}-${s.ivgen}${s.ivgen === 'essiv' ? `:${s.ivHash}` : ''}`;
}

// The hot loops live in small functions of their own so V8 optimises each one monomorphically.

/** X = C ^ T for every block, T the block's tweak: the sector's first tweak (t0) times alpha^j.
 *  Called twice per request (before and after the ECB pass): recomputing the tweaks is cheaper
 *  than storing and reloading them. dst may be C. */
function xtsXor(t0: Int32Array, dst: Int32Array, C: Int32Array, n: number, bps: number): void {
  let p = 0;
  for (let i = 0; i < n; i++) {
    let w0 = t0[4 * i], w1 = t0[4 * i + 1], w2 = t0[4 * i + 2], w3 = t0[4 * i + 3];
    for (let j = 0; j < bps; j++) {
      dst[p] = C[p] ^ w0; dst[p + 1] = C[p + 1] ^ w1; dst[p + 2] = C[p + 2] ^ w2; dst[p + 3] = C[p + 3] ^ w3;
      p += 4;
      const carry = w3 >> 31; // 0 or -1: the bit shifted out of the 128-bit tweak
      w3 = (w3 << 1) | (w2 >>> 31);
      w2 = (w2 << 1) | (w1 >>> 31);
      w1 = (w1 << 1) | (w0 >>> 31);
      w0 = (w0 << 1) ^ (carry & 0x87);
    }
  }
}

/** an Int32Array over the bytes: a view when aligned, else an aligned copy */
function aligned32(b: Uint8Array): Int32Array {
  if ((b.byteOffset & 3) === 0) return new Int32Array(b.buffer, b.byteOffset, b.length >> 2);
  const c = new Int32Array(b.length >> 2);
  new Uint8Array(c.buffer).set(b);
  return c;
}

/** a reusable scratch array (grown on demand, capped so a huge request does not pin memory) */
const SCRATCH_KEEP = 8 << 20;
const scratchBufs: Int32Array[] = [new Int32Array(0)];
function scratch(i: number, words: number): Int32Array {
  if (scratchBufs[i].length >= words) return scratchBufs[i].length === words ? scratchBufs[i] : scratchBufs[i].subarray(0, words);
  const a = new Int32Array(words);
  if (words * 4 <= SCRATCH_KEEP) scratchBufs[i] = a;
  return a;
}

/** XOR src into dst (same length). */
export function xorInto(dst: Uint8Array, src: Uint8Array): void {
  const n = dst.length;
  if ((dst.byteOffset & 3) === 0 && (src.byteOffset & 3) === 0 && (n & 3) === 0) {
    const d = new Int32Array(dst.buffer, dst.byteOffset, n >> 2);
    const s = new Int32Array(src.buffer, src.byteOffset, n >> 2);
    for (let i = 0; i < d.length; i++) d[i] ^= s[i];
  } else {
    for (let i = 0; i < n; i++) dst[i] ^= src[i];
  }
}

/** The cipher for the native data path (OpenSSL's name: AES without ESSIV), else null; the IV
 *  of the sector holding host byte h is (h - ivBase) / sectorSize. */
export function hostCrypt(spec: SectorCipherSpec, key: Uint8Array, sectorSize: number, ivBase: number): HostCrypt | null {
  if (spec.alg !== 'aes' || spec.ivgen === 'essiv') return null;
  const bits = (spec.mode === 'xts' ? key.length / 2 : key.length) * 8;
  if (bits !== 128 && bits !== 192 && bits !== 256) return null;
  const ivBits = spec.ivgen === 'plain64' ? 64 : spec.ivgen === 'plain' ? 32 : 0;
  if (spec.mode !== 'ecb' && ivBits === 0) return null;
  return { cipher: `aes-${bits}-${spec.mode}`, ivBits, key, sectorSize, ivBase };
}

export class SectorCipher {
  private c1: BlockCipher;
  private c2: BlockCipher | null = null; // xts tweak cipher
  private essiv: BlockCipher | null = null;

  constructor(readonly spec: SectorCipherSpec, key: Uint8Array, readonly sectorSize: number) {
    if (sectorSize % 16 || sectorSize < 16) throw new ImgError('image', `invalid sector size ${sectorSize}`);
    if (spec.mode === 'xts') {
      if (key.length % 2) throw new ImgError('crypto', 'xts: odd key length');
      this.c1 = makeCipher(spec.alg, key.subarray(0, key.length / 2));
      this.c2 = makeCipher(spec.alg, key.subarray(key.length / 2));
    } else {
      this.c1 = makeCipher(spec.alg, key);
    }
    if (spec.ivgen === 'essiv') {
      const salt = crypto.createHash(spec.ivHash as string).update(key).digest();
      this.essiv = makeCipher(spec.alg, salt);
    }
  }

  /** the IVs of n sectors starting at `sector`, 16 bytes each */
  private ivs(sector: number, n: number): Buffer {
    const iv = Buffer.alloc(n * 16);
    const ivgen = this.spec.ivgen;
    if (ivgen === null) return iv;
    let lo = sector % 0x100000000;
    let hi = Math.floor(sector / 0x100000000);
    for (let i = 0; i < n; i++) {
      iv.writeUInt32LE(lo, i * 16);
      if (ivgen !== 'plain') iv.writeUInt32LE(hi, i * 16 + 4);
      if (++lo === 0x100000000) { lo = 0; hi++; }
    }
    return this.essiv ? this.essiv.ecbEncrypt(iv) : iv;
  }

  /** XTS over a run of sectors with three passes over the data: (1) tweaks of every block,
   *  expanded from E_K2(IV) by multiplication with alpha, fused with X = data ^ T; (2) one ECB
   *  call on X; (3) data = ECB(X) ^ T written straight back into the caller's buffer. */
  private xts(buf: Uint8Array, sector: number, n: number, enc: boolean): void {
    const bps = this.sectorSize / 16;
    const words = buf.length >> 2;
    const t0b = (this.c2 as BlockCipher).ecbEncrypt(this.ivs(sector, n));
    const t0 = aligned32(t0b);
    const X = scratch(0, words);
    const direct = (buf.byteOffset & 3) === 0;
    const C = direct ? new Int32Array(buf.buffer, buf.byteOffset, words) : aligned32(buf);
    xtsXor(t0, X, C, n, bps);
    const xb = new Uint8Array(X.buffer, X.byteOffset, buf.length);
    const yb = enc ? this.c1.ecbEncrypt(xb) : this.c1.ecbDecrypt(xb);
    const Y = aligned32(yb);
    if (direct) xtsXor(t0, C, Y, n, bps);
    else {
      xtsXor(t0, Y, Y, n, bps);
      buf.set(new Uint8Array(Y.buffer, Y.byteOffset, buf.length));
    }
  }

  /** CTR keystream: block j of a sector is E(IV + j), the IV a 128-bit big-endian counter */
  private keystream(sector: number, n: number): Buffer {
    const bps = this.sectorSize / 16;
    const iv = this.ivs(sector, n);
    const ctr = Buffer.allocUnsafe(n * this.sectorSize);
    for (let i = 0; i < n; i++) {
      const b = iv.subarray(i * 16, i * 16 + 16);
      for (let j = 0; j < bps; j++) {
        ctr.set(b, (i * bps + j) * 16);
        // increment big-endian
        for (let k = 15; k >= 0; k--) { b[k] = (b[k] + 1) & 0xff; if (b[k] !== 0) break; }
      }
    }
    return this.c1.ecbEncrypt(ctr);
  }

  private check(buf: Uint8Array, sector: number): number {
    if (buf.length % this.sectorSize) throw new ImgError('io', `crypto: request of ${buf.length} bytes is not a multiple of the sector size`);
    if (!Number.isSafeInteger(sector) || sector < 0) throw new ImgError('io', 'crypto: bad sector number');
    return buf.length / this.sectorSize;
  }

  /** decrypts buf (whole sectors, the first one numbered `sector`) in place */
  decrypt(buf: Uint8Array, sector: number): void {
    const n = this.check(buf, sector);
    if (n === 0) return;
    switch (this.spec.mode) {
      case 'xts': this.xts(buf, sector, n, false); return;
      case 'cbc': {
        // P_i = D(C_i) ^ C_(i-1), the IV at sector starts; backwards so C_(i-1) is still there
        const iv = aligned32(this.ivs(sector, n));
        const D = aligned32(this.c1.ecbDecrypt(buf));
        const direct = (buf.byteOffset & 3) === 0;
        const B = direct ? new Int32Array(buf.buffer, buf.byteOffset, buf.length >> 2) : aligned32(buf);
        const wps = this.sectorSize >> 2;
        for (let i = B.length - 4; i >= 0; i -= 4) {
          const inSector = i % wps;
          if (inSector === 0) {
            const v = (i / wps) * 4;
            B[i] = D[i] ^ iv[v]; B[i + 1] = D[i + 1] ^ iv[v + 1]; B[i + 2] = D[i + 2] ^ iv[v + 2]; B[i + 3] = D[i + 3] ^ iv[v + 3];
          } else {
            B[i] = D[i] ^ B[i - 4]; B[i + 1] = D[i + 1] ^ B[i - 3]; B[i + 2] = D[i + 2] ^ B[i - 2]; B[i + 3] = D[i + 3] ^ B[i - 1];
          }
        }
        if (!direct) buf.set(new Uint8Array(B.buffer, B.byteOffset, buf.length));
        return;
      }
      case 'ecb': buf.set(this.c1.ecbDecrypt(buf)); return;
      case 'ctr': xorInto(buf, this.keystream(sector, n)); return;
    }
  }

  /** encrypts buf (whole sectors) in place */
  encrypt(buf: Uint8Array, sector: number): void {
    const n = this.check(buf, sector);
    if (n === 0) return;
    switch (this.spec.mode) {
      case 'xts': this.xts(buf, sector, n, true); return;
      case 'cbc': {
        const iv = this.ivs(sector, n);
        const ss = this.sectorSize;
        for (let i = 0; i < n; i++) {
          const s = buf.subarray(i * ss, i * ss + ss);
          s.set(this.c1.cbcEncrypt(s, iv.subarray(i * 16, i * 16 + 16)));
        }
        return;
      }
      case 'ecb': buf.set(this.c1.ecbEncrypt(buf)); return;
      case 'ctr': xorInto(buf, this.keystream(sector, n)); return;
    }
  }
}
