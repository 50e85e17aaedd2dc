// PBKDF2 (OpenSSL through Node) with qemu's iteration benchmark, and argon2 (hash-wasm).
import crypto from 'node:crypto';
import { promisify } from 'node:util';
import { ImgError } from '../core/errors';
import type { HashAlg } from './modes';

const pbkdf2Async = promisify(crypto.pbkdf2);

export async function pbkdf2(hash: HashAlg, pass: Uint8Array, salt: Uint8Array, iterations: number, len: number): Promise<Buffer> {
  try {
    return await pbkdf2Async(pass, salt, iterations, len, hash);
  } catch (e) {
    throw new ImgError('crypto', `pbkdf2-${hash}: ${(e as Error).message.split('\n')[0]}`, e);
  }
}

/** iterations per `ms` milliseconds, measured the way qemu's qcrypto_pbkdf2_count_iters does:
 *  run a growing number of iterations until one run takes long enough to time (qemu waits for
 *  500 ms; we stop at 10..100 ms, depending on the target, to keep create fast) and scale. */
export function pbkdf2Iterations(hash: HashAlg, keyLen: number, ms: number): number {
  const pass = Buffer.from('imgmount-pbkdf2-benchmark');
  const salt = crypto.randomBytes(32);
  let iters = 1 << 10;
  for (;;) {
    const t0 = process.hrtime.bigint();
    crypto.pbkdf2Sync(pass, salt, iters, keyLen, hash);
    const dt = Number(process.hrtime.bigint() - t0) / 1e6;
    if (dt >= Math.max(10, Math.min(100, ms)) || iters >= 1 << 30) {
      const n = Math.floor((iters * ms) / Math.max(dt, 0.001));
      return Math.min(Math.max(n, 1), 0xffffffff);
    }
    iters *= 2;
  }
}

export type Argon2Type = 'argon2i' | 'argon2id';

/** argon2 raw hash (hash-wasm: WebAssembly, no native build, loaded on demand) */
export async function argon2(type: Argon2Type, pass: Uint8Array, salt: Uint8Array, time: number, memoryKiB: number,
  parallelism: number, len: number): Promise<Buffer> {
  let hw: typeof import('hash-wasm');
  try {
    hw = await import('hash-wasm');
  } catch {
    throw new ImgError('unsupported', `${type}: the hash-wasm package is missing (npm install hash-wasm)`);
  }
  const fn = type === 'argon2i' ? hw.argon2i : hw.argon2id;
  const out = await fn({ password: pass, salt, iterations: time, memorySize: memoryKiB, parallelism, hashLength: len, outputType: 'binary' });
  return Buffer.from(out);
}
