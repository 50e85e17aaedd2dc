// Twofish (Schneier et al., "Twofish: A 128-Bit Block Cipher", 1998), written from the paper:
// q0/q1 permutations from their 4-bit t-tables, the RS code for the S-box key words, the MDS
// matrix over GF(2^8)/0x169, key-dependent S-boxes folded with the MDS into four 256-entry
// tables, 40 subkeys, 16 Feistel rounds with input/output whitening. Bytes are little-endian
// words, as in the paper, dm-crypt and qemu.
import type { RawBlockCipher } from './cipher';

const T = {
  q0: [[8, 1, 7, 13, 6, 15, 3, 2, 0, 11, 5, 9, 14, 12, 10, 4], [14, 12, 11, 8, 1, 2, 3, 5, 15, 4, 10, 6, 7, 0, 9, 13],
    [11, 10, 5, 14, 6, 13, 9, 0, 12, 8, 15, 3, 2, 4, 7, 1], [13, 7, 15, 4, 1, 2, 6, 14, 9, 11, 3, 0, 8, 5, 12, 10]],
  q1: [[2, 8, 11, 13, 15, 7, 6, 14, 3, 1, 9, 4, 0, 10, 12, 5], [1, 14, 2, 11, 4, 12, 3, 7, 6, 13, 10, 5, 15, 9, 0, 8],
    [4, 12, 7, 5, 1, 6, 9, 10, 0, 14, 13, 8, 2, 11, 3, 15], [11, 9, 5, 1, 12, 3, 13, 14, 6, 4, 7, 15, 2, 0, 8, 10]],
};

function makeQ(t: number[][]): Uint8Array {
  const q = new Uint8Array(256);
  const ror4 = (x: number): number => ((x >>> 1) | (x << 3)) & 15;
  for (let x = 0; x < 256; x++) {
    let a = x >>> 4, b = x & 15;
    let a1 = a ^ b, b1 = (a ^ ror4(b) ^ (8 * a)) & 15;
    a = t[0][a1]; b = t[1][b1];
    a1 = a ^ b; b1 = (a ^ ror4(b) ^ (8 * a)) & 15;
    a = t[2][a1]; b = t[3][b1];
    q[x] = (b << 4) | a;
  }
  return q;
}
const Q0 = makeQ(T.q0);
const Q1 = makeQ(T.q1);

function gfMul(a: number, b: number, poly: number): number {
  let r = 0;
  while (b) {
    if (b & 1) r ^= a;
    a <<= 1;
    if (a & 0x100) a ^= poly;
    b >>>= 1;
  }
  return r;
}

const MDS = [[0x01, 0xef, 0x5b, 0x5b], [0x5b, 0xef, 0xef, 0x01], [0xef, 0x5b, 0x01, 0xef], [0xef, 0x01, 0xef, 0x5b]];
const RS = [[0x01, 0xa4, 0x55, 0x87, 0x5a, 0x58, 0xdb, 0x9e], [0xa4, 0x56, 0x82, 0xf3, 0x1e, 0xc6, 0x68, 0xe5],
  [0x02, 0xa1, 0xfc, 0xc1, 0x47, 0xae, 0x3d, 0x19], [0xa4, 0x55, 0x87, 0x5a, 0x58, 0xdb, 0x9e, 0x03]];

/** MDS multiply of byte y in column j, as a word */
function mdsCol(j: number, y: number): number {
  let w = 0;
  for (let i = 0; i < 4; i++) w |= gfMul(MDS[i][j], y, 0x169) << (8 * i);
  return w >>> 0;
}

/** the S-box part of h: bytes of x through the q chain keyed by the words of L */
function hBytes(x: number, L: number[]): number[] {
  const k = L.length;
  const b = (w: number, i: number): number => (w >>> (8 * i)) & 0xff;
  let y0 = x & 0xff, y1 = (x >>> 8) & 0xff, y2 = (x >>> 16) & 0xff, y3 = x >>> 24;
  if (k === 4) { y0 = Q1[y0] ^ b(L[3], 0); y1 = Q0[y1] ^ b(L[3], 1); y2 = Q0[y2] ^ b(L[3], 2); y3 = Q1[y3] ^ b(L[3], 3); }
  if (k >= 3) { y0 = Q1[y0] ^ b(L[2], 0); y1 = Q1[y1] ^ b(L[2], 1); y2 = Q0[y2] ^ b(L[2], 2); y3 = Q0[y3] ^ b(L[2], 3); }
  y0 = Q1[Q0[Q0[y0] ^ b(L[1], 0)] ^ b(L[0], 0)];
  y1 = Q0[Q0[Q1[y1] ^ b(L[1], 1)] ^ b(L[0], 1)];
  y2 = Q1[Q1[Q0[y2] ^ b(L[1], 2)] ^ b(L[0], 2)];
  y3 = Q0[Q1[Q1[y3] ^ b(L[1], 3)] ^ b(L[0], 3)];
  return [y0, y1, y2, y3];
}

function h(x: number, L: number[]): number {
  const y = hBytes(x, L);
  return (mdsCol(0, y[0]) ^ mdsCol(1, y[1]) ^ mdsCol(2, y[2]) ^ mdsCol(3, y[3])) >>> 0;
}

const rol = (x: number, n: number): number => ((x << n) | (x >>> (32 - n))) >>> 0;
const ror = (x: number, n: number): number => ((x >>> n) | (x << (32 - n))) >>> 0;

export class Twofish implements RawBlockCipher {
  private K = new Uint32Array(40);
  private G = [new Uint32Array(256), new Uint32Array(256), new Uint32Array(256), new Uint32Array(256)];

  constructor(key: Uint8Array) {
    if (key.length !== 16 && key.length !== 24 && key.length !== 32) throw new RangeError('twofish: key must be 16, 24 or 32 bytes');
    const k = key.length / 8;
    const kb = Buffer.from(key);
    const Me: number[] = [], Mo: number[] = [], S: number[] = [];
    for (let i = 0; i < 2 * k; i++) (i % 2 ? Mo : Me).push(kb.readUInt32LE(4 * i));
    for (let i = 0; i < k; i++) {
      let w = 0;
      for (let r = 0; r < 4; r++) {
        let s = 0;
        for (let c = 0; c < 8; c++) s ^= gfMul(RS[r][c], kb[8 * i + c], 0x14d);
        w |= s << (8 * r);
      }
      S.unshift(w >>> 0); // S = (S_{k-1}, ..., S_0)
    }
    const rho = 0x01010101;
    for (let i = 0; i < 20; i++) {
      const A = h(Math.imul(2 * i, rho) >>> 0, Me);
      const B = rol(h(Math.imul(2 * i + 1, rho) >>> 0, Mo), 8);
      this.K[2 * i] = (A + B) >>> 0;
      this.K[2 * i + 1] = rol((A + 2 * B) >>> 0, 9);
    }
    // g(X) = G0[x0] ^ G1[x1] ^ G2[x2] ^ G3[x3]
    for (let x = 0; x < 256; x++) {
      const y = hBytes(x | (x << 8) | (x << 16) | (x << 24), S);
      for (let j = 0; j < 4; j++) this.G[j][x] = mdsCol(j, y[j]);
    }
  }

  private g(x: number): number {
    const G = this.G;
    return (G[0][x & 0xff] ^ G[1][(x >>> 8) & 0xff] ^ G[2][(x >>> 16) & 0xff] ^ G[3][x >>> 24]) >>> 0;
  }

  encryptBlock(src: Uint8Array, so: number, dst: Uint8Array, d: number): void {
    const K = this.K;
    let r0 = rd(src, so) ^ K[0], r1 = rd(src, so + 4) ^ K[1], r2 = rd(src, so + 8) ^ K[2], r3 = rd(src, so + 12) ^ K[3];
    for (let r = 0; r < 16; r++) {
      const t0 = this.g(r0 >>> 0);
      const t1 = this.g(rol(r1 >>> 0, 8));
      const f0 = (t0 + t1 + K[2 * r + 8]) >>> 0;
      const f1 = (t0 + 2 * t1 + K[2 * r + 9]) >>> 0;
      const n2 = ror((r2 ^ f0) >>> 0, 1);
      const n3 = (rol(r3 >>> 0, 1) ^ f1) >>> 0;
      r2 = r0; r3 = r1; r0 = n2; r1 = n3;
    }
    wr(dst, d, r2 ^ K[4]); wr(dst, d + 4, r3 ^ K[5]); wr(dst, d + 8, r0 ^ K[6]); wr(dst, d + 12, r1 ^ K[7]);
  }

  decryptBlock(src: Uint8Array, so: number, dst: Uint8Array, d: number): void {
    const K = this.K;
    // undo output whitening and the final swap
    let r2 = rd(src, so) ^ K[4], r3 = rd(src, so + 4) ^ K[5], r0 = rd(src, so + 8) ^ K[6], r1 = rd(src, so + 12) ^ K[7];
    for (let r = 15; r >= 0; r--) {
      // state before round r was (p0, p1, p2, p3) with r0 = f(p2...), r2 = p0, r3 = p1
      const p0 = r2, p1 = r3;
      const t0 = this.g(p0 >>> 0);
      const t1 = this.g(rol(p1 >>> 0, 8));
      const f0 = (t0 + t1 + K[2 * r + 8]) >>> 0;
      const f1 = (t0 + 2 * t1 + K[2 * r + 9]) >>> 0;
      const p2 = (rol(r0 >>> 0, 1) ^ f0) >>> 0;
      const p3 = ror((r1 ^ f1) >>> 0, 1);
      r0 = p0; r1 = p1; r2 = p2; r3 = p3;
    }
    wr(dst, d, r0 ^ K[0]); wr(dst, d + 4, r1 ^ K[1]); wr(dst, d + 8, r2 ^ K[2]); wr(dst, d + 12, r3 ^ K[3]);
  }
}

function rd(b: Uint8Array, o: number): number {
  return (b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24)) >>> 0;
}
function wr(b: Uint8Array, o: number, v: number): void {
  b[o] = v & 0xff; b[o + 1] = (v >>> 8) & 0xff; b[o + 2] = (v >>> 16) & 0xff; b[o + 3] = (v >>> 24) & 0xff;
}
