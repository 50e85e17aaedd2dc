// Serpent (Anderson, Biham, Knudsen, "Serpent: A Proposal for the AES", 1998), written from the
// paper's bitslice description: 32 rounds of key mixing, one of eight 4-bit S-boxes applied
// across the four 32-bit words, and the linear transformation; the key schedule pads short keys
// with a single 1 bit, expands with the golden-ratio recurrence and passes the prekeys through
// the S-boxes. Words are little-endian (the byte order of libgcrypt, nettle, Linux and qemu).
// The S-boxes work on four bit columns at a time through 64 Ki-entry tables (built on first use).
import type { RawBlockCipher } from './cipher';

const SBOX = [
  [3, 8, 15, 1, 10, 6, 5, 11, 14, 13, 4, 2, 7, 0, 9, 12],
  [15, 12, 2, 7, 9, 0, 5, 10, 1, 11, 14, 8, 6, 13, 3, 4],
  [8, 6, 7, 9, 3, 12, 10, 15, 13, 1, 14, 4, 0, 11, 5, 2],
  [0, 15, 11, 8, 12, 9, 6, 3, 13, 1, 2, 4, 10, 7, 5, 14],
  [1, 15, 8, 3, 12, 0, 11, 6, 2, 5, 4, 10, 9, 14, 7, 13],
  [15, 5, 2, 11, 4, 10, 9, 12, 0, 3, 14, 8, 13, 6, 7, 1],
  [7, 2, 12, 5, 8, 4, 6, 11, 14, 9, 1, 15, 13, 3, 10, 0],
  [1, 13, 15, 0, 14, 8, 2, 11, 7, 4, 12, 10, 9, 3, 5, 6],
];
const INV = SBOX.map((s) => { const r = new Array<number>(16); s.forEach((v, i) => { r[v] = i; }); return r; });

type Words = Int32Array;

/** 16-bit tables: 4 bit columns at once (4 bits of each word in, 4 bits of each word out) */
const tables = new Map<number[], Uint16Array>();
function tableOf(box: number[]): Uint16Array {
  let t = tables.get(box);
  if (t) return t;
  t = new Uint16Array(65536);
  for (let idx = 0; idx < 65536; idx++) {
    let v = 0;
    for (let c = 0; c < 4; c++) {
      const nib = ((idx >>> c) & 1) | (((idx >>> (4 + c)) & 1) << 1) | (((idx >>> (8 + c)) & 1) << 2) | (((idx >>> (12 + c)) & 1) << 3);
      const o = box[nib];
      v |= ((o & 1) << c) | (((o >>> 1) & 1) << (4 + c)) | (((o >>> 2) & 1) << (8 + c)) | (((o >>> 3) & 1) << (12 + c));
    }
    t[idx] = v;
  }
  tables.set(box, t);
  return t;
}

function applySbox(box: number[], w: Words): void {
  const t = tableOf(box);
  let o0 = 0, o1 = 0, o2 = 0, o3 = 0;
  const x0 = w[0], x1 = w[1], x2 = w[2], x3 = w[3];
  for (let s = 0; s < 32; s += 4) {
    const v = t[((x0 >>> s) & 15) | (((x1 >>> s) & 15) << 4) | (((x2 >>> s) & 15) << 8) | (((x3 >>> s) & 15) << 12)];
    o0 |= (v & 15) << s; o1 |= ((v >>> 4) & 15) << s; o2 |= ((v >>> 8) & 15) << s; o3 |= (v >>> 12) << s;
  }
  w[0] = o0; w[1] = o1; w[2] = o2; w[3] = o3;
}

const rol = (x: number, n: number): number => (x << n) | (x >>> (32 - n));
const ror = (x: number, n: number): number => (x >>> n) | (x << (32 - n));

function lt(w: Words): void {
  let x0 = w[0], x1 = w[1], x2 = w[2], x3 = w[3];
  x0 = rol(x0, 13); x2 = rol(x2, 3);
  x1 ^= x0 ^ x2; x3 ^= x2 ^ (x0 << 3);
  x1 = rol(x1, 1); x3 = rol(x3, 7);
  x0 ^= x1 ^ x3; x2 ^= x3 ^ (x1 << 7);
  x0 = rol(x0, 5); x2 = rol(x2, 22);
  w[0] = x0; w[1] = x1; w[2] = x2; w[3] = x3;
}

function ltInv(w: Words): void {
  let x0 = w[0], x1 = w[1], x2 = w[2], x3 = w[3];
  x2 = ror(x2, 22); x0 = ror(x0, 5);
  x2 ^= x3 ^ (x1 << 7); x0 ^= x1 ^ x3;
  x3 = ror(x3, 7); x1 = ror(x1, 1);
  x3 ^= x2 ^ (x0 << 3); x1 ^= x0 ^ x2;
  x2 = ror(x2, 3); x0 = ror(x0, 13);
  w[0] = x0; w[1] = x1; w[2] = x2; w[3] = x3;
}

export class Serpent implements RawBlockCipher {
  private K = new Int32Array(33 * 4);
  private w = new Int32Array(4);

  constructor(key: Uint8Array) {
    if (key.length < 1 || key.length > 32) throw new RangeError('serpent: key must be 1..32 bytes');
    const kb = new Uint8Array(32);
    kb.set(key);
    if (key.length < 32) kb[key.length] = 1;
    const pre = new Int32Array(8 + 132);
    for (let i = 0; i < 8; i++) pre[i] = kb[4 * i] | (kb[4 * i + 1] << 8) | (kb[4 * i + 2] << 16) | (kb[4 * i + 3] << 24);
    for (let i = 0; i < 132; i++) {
      const v = pre[i] ^ pre[i + 3] ^ pre[i + 5] ^ pre[i + 7] ^ 0x9e3779b9 ^ i;
      pre[i + 8] = rol(v, 11);
    }
    const t = new Int32Array(4);
    for (let i = 0; i < 33; i++) {
      t.set(pre.subarray(8 + 4 * i, 8 + 4 * i + 4));
      applySbox(SBOX[(3 - i + 32) % 8], t);
      this.K.set(t, 4 * i);
    }
  }

  private mix(r: number): void {
    const K = this.K, w = this.w;
    w[0] ^= K[4 * r]; w[1] ^= K[4 * r + 1]; w[2] ^= K[4 * r + 2]; w[3] ^= K[4 * r + 3];
  }

  encryptBlock(src: Uint8Array, so: number, dst: Uint8Array, d: number): void {
    const w = this.w;
    for (let i = 0; i < 4; i++) w[i] = src[so + 4 * i] | (src[so + 4 * i + 1] << 8) | (src[so + 4 * i + 2] << 16) | (src[so + 4 * i + 3] << 24);
    for (let r = 0; r < 31; r++) {
      this.mix(r);
      applySbox(SBOX[r % 8], w);
      lt(w);
    }
    this.mix(31);
    applySbox(SBOX[7], w);
    this.mix(32);
    out(w, dst, d);
  }

  decryptBlock(src: Uint8Array, so: number, dst: Uint8Array, d: number): void {
    const w = this.w;
    for (let i = 0; i < 4; i++) w[i] = src[so + 4 * i] | (src[so + 4 * i + 1] << 8) | (src[so + 4 * i + 2] << 16) | (src[so + 4 * i + 3] << 24);
    this.mix(32);
    applySbox(INV[7], w);
    this.mix(31);
    for (let r = 30; r >= 0; r--) {
      ltInv(w);
      applySbox(INV[r % 8], w);
      this.mix(r);
    }
    out(w, dst, d);
  }
}

function out(w: Words, dst: Uint8Array, d: number): void {
  for (let i = 0; i < 4; i++) {
    const v = w[i];
    dst[d + 4 * i] = v & 0xff; dst[d + 4 * i + 1] = (v >>> 8) & 0xff; dst[d + 4 * i + 2] = (v >>> 16) & 0xff; dst[d + 4 * i + 3] = (v >>> 24) & 0xff;
  }
}
