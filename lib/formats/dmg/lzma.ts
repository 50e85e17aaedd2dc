// xz (LZMA2) decompressor for dmg chunk type 0x80000008 ("ULMO"; 7-Zip's DMG handler reads
// these chunks as xz streams). Written from the .xz file format specification (tukaani.org)
// and the LZMA specification (lzma-specification.txt): stream header/footer, blocks with an
// LZMA2 filter only, CRC32/CRC64/SHA-256 checks, LZMA2 chunks (stored and LZMA), and the
// LZMA range decoder. Output is bounded by the caller's size; every length is checked.
import crypto from 'node:crypto';
import zlib from 'node:zlib';

function fail(msg: string): never { throw new Error(`LZMA: ${msg}`); }

const crc32 = (b: Uint8Array): number => zlib.crc32(b) >>> 0;

// CRC-64/XZ (ECMA-182, reflected), as two 32-bit halves
const CRC64_LO = new Uint32Array(256);
const CRC64_HI = new Uint32Array(256);
{
  const POLY_LO = 0xd7870f42, POLY_HI = 0xc96c5795;
  for (let i = 0; i < 256; i++) {
    let lo = i, hi = 0;
    for (let k = 0; k < 8; k++) {
      const x = lo & 1;
      lo = ((lo >>> 1) | ((hi & 1) << 31)) >>> 0;
      hi = hi >>> 1;
      if (x) { lo = (lo ^ POLY_LO) >>> 0; hi = (hi ^ POLY_HI) >>> 0; }
    }
    CRC64_LO[i] = lo;
    CRC64_HI[i] = hi;
  }
}
function crc64(b: Uint8Array): Buffer {
  let lo = 0xffffffff, hi = 0xffffffff;
  for (let i = 0; i < b.length; i++) {
    const idx = (lo ^ b[i]) & 0xff;
    lo = (((lo >>> 8) | ((hi & 0xff) << 24)) ^ CRC64_LO[idx]) >>> 0;
    hi = ((hi >>> 8) ^ CRC64_HI[idx]) >>> 0;
  }
  const out = Buffer.alloc(8);
  out.writeUInt32LE(~lo >>> 0, 0);
  out.writeUInt32LE(~hi >>> 0, 4);
  return out;
}

class RangeDecoder {
  range = 0xffffffff;
  code = 0;
  constructor(private src: Uint8Array, public pos: number, private end: number) {
    if (end - pos < 5) fail('truncated range coder');
    if (src[pos] !== 0) fail('bad range coder start');
    this.code = ((src[pos + 1] << 24) | (src[pos + 2] << 16) | (src[pos + 3] << 8) | src[pos + 4]) >>> 0;
    this.pos = pos + 5;
    if (this.code === this.range) fail('bad range coder start');
  }
  private next(): number {
    if (this.pos >= this.end) fail('compressed data truncated');
    return this.src[this.pos++];
  }
  bit(p: Uint16Array, i: number): number {
    const bound = ((this.range >>> 11) * p[i]) >>> 0;
    let b: number;
    if (this.code < bound) {
      this.range = bound;
      p[i] += (2048 - p[i]) >>> 5;
      b = 0;
    } else {
      this.range = (this.range - bound) >>> 0;
      this.code = (this.code - bound) >>> 0;
      p[i] -= p[i] >>> 5;
      b = 1;
    }
    if (this.range < 0x1000000) {
      this.range = (this.range << 8) >>> 0;
      this.code = ((this.code << 8) | this.next()) >>> 0;
    }
    return b;
  }
  direct(n: number): number {
    let r = 0;
    for (let i = 0; i < n; i++) {
      this.range = this.range >>> 1;
      let b = 0;
      if (this.code >= this.range) { this.code = (this.code - this.range) >>> 0; b = 1; }
      r = ((r << 1) | b) >>> 0;
      if (this.range < 0x1000000) {
        this.range = (this.range << 8) >>> 0;
        this.code = ((this.code << 8) | this.next()) >>> 0;
      }
    }
    return r;
  }
  tree(p: Uint16Array, base: number, bits: number): number {
    let m = 1;
    for (let i = 0; i < bits; i++) m = (m << 1) | this.bit(p, base + m);
    return m - (1 << bits);
  }
  reverse(p: Uint16Array, base: number, bits: number): number {
    let m = 1, sym = 0;
    for (let i = 0; i < bits; i++) {
      const b = this.bit(p, base + m);
      m = (m << 1) | b;
      sym |= b << i;
    }
    return sym;
  }
}

// probability array layout
const N_STATES = 12;
const POS_STATES_MAX = 16;
const IS_MATCH = 0;
const IS_REP = IS_MATCH + N_STATES * POS_STATES_MAX;
const IS_REP_G0 = IS_REP + N_STATES;
const IS_REP_G1 = IS_REP_G0 + N_STATES;
const IS_REP_G2 = IS_REP_G1 + N_STATES;
const IS_REP0_LONG = IS_REP_G2 + N_STATES;
const POS_SLOT = IS_REP0_LONG + N_STATES * POS_STATES_MAX;
const SPEC_POS = POS_SLOT + 4 * 64;
const ALIGN = SPEC_POS + 115;
const LEN = ALIGN + 16;
const LEN_SIZE = 2 + 16 * 8 + 16 * 8 + 256;
const REP_LEN = LEN + LEN_SIZE;
const LITERAL = REP_LEN + LEN_SIZE;

class Lzma {
  lc = 0; lp = 0; pb = 0;
  probs = new Uint16Array(LITERAL + 0x300 * 16);
  state = 0;
  reps = [0, 0, 0, 0];
  setProps(d: number): void {
    if (d >= 9 * 5 * 5) fail('bad properties');
    this.lc = d % 9;
    d = Math.floor(d / 9);
    this.lp = d % 5;
    this.pb = Math.floor(d / 5);
    if (this.lc + this.lp > 4) fail('lc + lp > 4');
  }
  reset(): void {
    this.probs.fill(1024);
    this.state = 0;
    this.reps = [0, 0, 0, 0];
  }
  private len(rc: RangeDecoder, base: number, posState: number): number {
    const p = this.probs;
    if (!rc.bit(p, base)) return rc.tree(p, base + 2 + posState * 8 - 1, 3);
    if (!rc.bit(p, base + 1)) return 8 + rc.tree(p, base + 2 + 128 + posState * 8 - 1, 3);
    return 16 + rc.tree(p, base + 2 + 256 - 1, 8);
  }
  /** decodes until `out` holds `end` bytes; `dictStart` is where the dictionary was last reset */
  run(rc: RangeDecoder, out: Uint8Array, pos: number, end: number, dictStart: number): number {
    const p = this.probs;
    const pbMask = (1 << this.pb) - 1, lpMask = (1 << this.lp) - 1;
    let state = this.state;
    let [rep0, rep1, rep2, rep3] = this.reps;
    while (pos < end) {
      const posState = (pos - dictStart) & pbMask;
      if (!rc.bit(p, IS_MATCH + (state << 4) + posState)) {
        const prev = pos > dictStart ? out[pos - 1] : 0;
        const base = LITERAL + 0x300 * ((((pos - dictStart) & lpMask) << this.lc) + (prev >>> (8 - this.lc)));
        let sym = 1;
        if (state >= 7) {
          if (rep0 >= pos - dictStart) fail('match distance beyond the dictionary');
          let mb = out[pos - rep0 - 1];
          do {
            const mbit = (mb >>> 7) & 1;
            mb <<= 1;
            const b = rc.bit(p, base + ((1 + mbit) << 8) + sym);
            sym = (sym << 1) | b;
            if (mbit !== b) break;
          } while (sym < 0x100);
        }
        while (sym < 0x100) sym = (sym << 1) | rc.bit(p, base + sym);
        out[pos++] = sym & 0xff;
        state = state < 4 ? 0 : state < 10 ? state - 3 : state - 6;
        continue;
      }
      let len: number;
      if (rc.bit(p, IS_REP + state)) {
        if (pos === dictStart) fail('repeat match at the start of the dictionary');
        if (!rc.bit(p, IS_REP_G0 + state)) {
          if (!rc.bit(p, IS_REP0_LONG + (state << 4) + posState)) {
            state = state < 7 ? 9 : 11;
            if (rep0 >= pos - dictStart) fail('match distance beyond the dictionary');
            out[pos] = out[pos - rep0 - 1];
            pos++;
            continue;
          }
        } else {
          let dist: number;
          if (!rc.bit(p, IS_REP_G1 + state)) dist = rep1;
          else {
            if (!rc.bit(p, IS_REP_G2 + state)) dist = rep2;
            else { dist = rep3; rep3 = rep2; }
            rep2 = rep1;
          }
          rep1 = rep0;
          rep0 = dist;
        }
        len = this.len(rc, REP_LEN, posState);
        state = state < 7 ? 8 : 11;
      } else {
        rep3 = rep2; rep2 = rep1; rep1 = rep0;
        len = this.len(rc, LEN, posState);
        state = state < 7 ? 7 : 10;
        const lenState = len < 3 ? len : 3;
        const slot = rc.tree(p, POS_SLOT + lenState * 64 - 1 + 0, 6);
        if (slot < 4) rep0 = slot;
        else {
          const nd = (slot >>> 1) - 1;
          let dist = ((2 | (slot & 1)) << nd) >>> 0;
          if (slot < 14) dist = (dist + rc.reverse(p, SPEC_POS + dist - slot - 1, nd)) >>> 0;
          else {
            dist = (dist + ((rc.direct(nd - 4) << 4) >>> 0)) >>> 0;
            dist = (dist + rc.reverse(p, ALIGN - 1, 4)) >>> 0;
          }
          rep0 = dist;
        }
        if (rep0 === 0xffffffff) fail('unexpected end marker');
      }
      const n = len + 2;
      if (rep0 >= pos - dictStart) fail('match distance beyond the dictionary');
      if (pos + n > end) fail('match runs past the chunk end');
      const from = pos - rep0 - 1;
      if (rep0 + 1 >= n) out.copyWithin(pos, from, from + n);
      else for (let i = 0; i < n; i++) out[pos + i] = out[from + i];
      pos += n;
    }
    this.state = state;
    this.reps = [rep0, rep1, rep2, rep3];
    return pos;
  }
}

/** decodes LZMA2 chunks from src[p..end) into out[pos..); returns [input end, output end] */
function lzma2(src: Uint8Array, p: number, end: number, out: Uint8Array, pos: number): [number, number] {
  const lz = new Lzma();
  let dictStart = pos;
  let needDictReset = true, needProps = true;
  for (;;) {
    if (p >= end) fail('LZMA2 data truncated');
    const c = src[p++];
    if (c === 0) return [p, pos];
    if (c === 1 || c === 2) {
      if (p + 2 > end) fail('LZMA2 data truncated');
      const n = ((src[p] << 8) | src[p + 1]) + 1;
      p += 2;
      if (c === 1) { dictStart = pos; needDictReset = false; } else if (needDictReset) fail('LZMA2 missing dictionary reset');
      if (p + n > end) fail('LZMA2 data truncated');
      if (pos + n > out.length) fail('output is larger than declared');
      out.set(src.subarray(p, p + n), pos);
      p += n;
      pos += n;
      continue;
    }
    if (c < 0x80) fail(`bad LZMA2 control byte 0x${c.toString(16)}`);
    if (p + 4 > end) fail('LZMA2 data truncated');
    const unpacked = ((c & 0x1f) << 16) + ((src[p] << 8) | src[p + 1]) + 1;
    const packed = ((src[p + 2] << 8) | src[p + 3]) + 1;
    p += 4;
    const mode = (c >>> 5) & 3;
    if (mode === 3) { dictStart = pos; needDictReset = false; } else if (needDictReset) fail('LZMA2 missing dictionary reset');
    if (mode >= 2) {
      if (p >= end) fail('LZMA2 data truncated');
      lz.setProps(src[p++]);
      needProps = false;
    } else if (needProps) fail('LZMA2 missing properties');
    if (mode >= 1) lz.reset();
    if (p + packed > end) fail('LZMA2 data truncated');
    if (pos + unpacked > out.length) fail('output is larger than declared');
    const rc = new RangeDecoder(src, p, p + packed);
    pos = lz.run(rc, out, pos, pos + unpacked, dictStart);
    if (rc.pos !== p + packed) fail('LZMA2 chunk size mismatch');
    p += packed;
  }
}

function vli(src: Uint8Array, p: number, end: number): [number, number] {
  let v = 0;
  for (let i = 0; i < 9; i++) {
    if (p >= end) fail('truncated integer');
    const b = src[p++];
    v += (b & 0x7f) * 2 ** (7 * i);
    if (!(b & 0x80)) {
      if (i && b === 0) fail('non-minimal integer');
      if (v > Number.MAX_SAFE_INTEGER) fail('integer out of range');
      return [v, p];
    }
  }
  return fail('integer too long');
}

const CHECK_SIZE: Record<number, number> = { 0: 0, 1: 4, 4: 8, 10: 32 };

/** Decompresses one or more .xz streams into exactly `outLen` bytes. */
export function lzmaDecompress(src: Uint8Array, outLen: number): Buffer {
  const out = Buffer.alloc(outLen);
  let p = 0, pos = 0;
  const MAGIC = [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00];
  for (;;) {
    if (p + 12 > src.length) fail('truncated stream header');
    for (let i = 0; i < 6; i++) if (src[p + i] !== MAGIC[i]) fail('not an xz stream');
    if (src[p + 6] !== 0 || (src[p + 7] & 0xf0)) fail('unsupported stream flags');
    const check = src[p + 7] & 0x0f;
    if (CHECK_SIZE[check] === undefined) fail(`unsupported check type ${check}`);
    if (crc32(src.subarray(p + 6, p + 8)) !== Buffer.from(src.buffer, src.byteOffset + p + 8, 4).readUInt32LE(0)) fail('stream header CRC mismatch');
    p += 12;
    // blocks
    for (;;) {
      if (p >= src.length) fail('truncated block');
      if (src[p] === 0) break; // index
      const hsize = (src[p] + 1) * 4;
      if (p + hsize > src.length) fail('truncated block header');
      const h = src.subarray(p, p + hsize);
      if (crc32(h.subarray(0, hsize - 4)) !== Buffer.from(h.buffer, h.byteOffset + hsize - 4, 4).readUInt32LE(0)) fail('block header CRC mismatch');
      const flags = h[1];
      if (flags & 0x3c) fail('unsupported block flags');
      const nFilters = (flags & 3) + 1;
      let q = 2;
      let cSize = -1, uSize = -1;
      if (flags & 0x40) [cSize, q] = vli(h, q, hsize - 4);
      if (flags & 0x80) [uSize, q] = vli(h, q, hsize - 4);
      if (nFilters !== 1) fail('only the LZMA2 filter is supported');
      let id: number, psize: number;
      [id, q] = vli(h, q, hsize - 4);
      [psize, q] = vli(h, q, hsize - 4);
      if (id !== 0x21 || psize !== 1) fail(`unsupported filter 0x${id.toString(16)}`);
      if ((h[q] & 0xc0) || h[q] > 40) fail('bad LZMA2 dictionary size');
      q++;
      for (; q < hsize - 4; q++) if (h[q]) fail('non-zero block header padding');
      p += hsize;
      const dataEnd = cSize >= 0 ? p + cSize : src.length;
      if (dataEnd > src.length) fail('block data truncated');
      const startPos = pos;
      const dataStart = p;
      const [np, npos] = lzma2(src, p, dataEnd, out, pos);
      if (cSize >= 0 && np !== dataEnd) fail('block compressed size mismatch');
      if (uSize >= 0 && npos - startPos !== uSize) fail('block uncompressed size mismatch');
      pos = npos;
      p = np;
      // block padding: the compressed data is padded to a multiple of four bytes
      while ((p - dataStart) % 4) { if (p >= src.length || src[p]) fail('bad block padding'); p++; }
      const cs = CHECK_SIZE[check];
      if (p + cs > src.length) fail('truncated block check');
      const data = out.subarray(startPos, pos);
      const want = Buffer.from(src.subarray(p, p + cs));
      if (check === 1 && crc32(data) !== want.readUInt32LE(0)) fail('CRC32 mismatch');
      if (check === 4 && !crc64(data).equals(want)) fail('CRC64 mismatch');
      if (check === 10 && !crypto.createHash('sha256').update(data).digest().equals(want)) fail('SHA-256 mismatch');
      p += cs;
    }
    // index: records, padding, CRC32; then the 12-byte stream footer
    const idxStart = p;
    let n: number;
    [n, p] = vli(src, p + 1, src.length);
    if (n > src.length) fail('bad index');
    for (let i = 0; i < n; i++) { [, p] = vli(src, p, src.length); [, p] = vli(src, p, src.length); }
    while ((p - idxStart) % 4) { if (p >= src.length || src[p]) fail('bad index padding'); p++; }
    if (p + 4 > src.length || crc32(src.subarray(idxStart, p)) !== Buffer.from(src.buffer, src.byteOffset + p, 4).readUInt32LE(0)) fail('index CRC mismatch');
    p += 4;
    if (p + 12 > src.length || src[p + 10] !== 0x59 || src[p + 11] !== 0x5a) fail('bad stream footer');
    p += 12;
    // stream padding, then possibly another stream
    while (p + 4 <= src.length && src[p] === 0 && src[p + 1] === 0 && src[p + 2] === 0 && src[p + 3] === 0) p += 4;
    if (p >= src.length) break;
  }
  if (pos !== outLen) fail(`output is ${pos} bytes, expected ${outLen}`);
  return out;
}
