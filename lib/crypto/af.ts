// The LUKS anti-forensic splitter (Clemens Fruhwirth's AF-splitter, LUKS1 spec section 2.4).
import crypto from 'node:crypto';
import { hashLen, HashAlg } from './modes';

function diffuse(buf: Buffer, hash: HashAlg): void {
  const ds = hashLen(hash);
  const idx = Buffer.alloc(4);
  for (let off = 0, i = 0; off < buf.length; off += ds, i++) {
    const len = Math.min(ds, buf.length - off);
    idx.writeUInt32BE(i, 0);
    const d = crypto.createHash(hash).update(idx).update(buf.subarray(off, off + len)).digest();
    d.copy(buf, off, 0, len);
  }
}

/** merges `stripes` stripes of key.length bytes back into the key */
export function afMerge(material: Uint8Array, keyLen: number, stripes: number, hash: HashAlg): Buffer {
  const d = Buffer.alloc(keyLen);
  for (let s = 0; s < stripes - 1; s++) {
    const st = material.subarray(s * keyLen, (s + 1) * keyLen);
    for (let k = 0; k < keyLen; k++) d[k] ^= st[k];
    diffuse(d, hash);
  }
  const last = material.subarray((stripes - 1) * keyLen, stripes * keyLen);
  for (let k = 0; k < keyLen; k++) d[k] ^= last[k];
  return d;
}

/** splits key into `stripes` stripes (random except the last) */
export function afSplit(key: Uint8Array, stripes: number, hash: HashAlg): Buffer {
  const keyLen = key.length;
  const out = crypto.randomBytes(keyLen * stripes);
  const d = Buffer.alloc(keyLen);
  for (let s = 0; s < stripes - 1; s++) {
    const st = out.subarray(s * keyLen, (s + 1) * keyLen);
    for (let k = 0; k < keyLen; k++) d[k] ^= st[k];
    diffuse(d, hash);
  }
  const last = out.subarray((stripes - 1) * keyLen);
  for (let k = 0; k < keyLen; k++) last[k] = d[k] ^ key[k];
  return out;
}
