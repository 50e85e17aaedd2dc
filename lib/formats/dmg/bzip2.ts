// A bzip2 decompressor (no bzip2 in Node's zlib). Written from the format as documented in
// Joe Tsai's "bzip2 format specification" and the bzip2 manual: stream header "BZh1".."BZh9",
// blocks (Huffman-coded MTF/RLE2 symbols of a Burrows-Wheeler transform, then RLE1), an
// end-of-stream marker with the combined CRC; concatenated streams are accepted.
// Every count is bounded by the block size; output is bounded by the caller's size.

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i << 24;
    for (let k = 0; k < 8; k++) c = c & 0x80000000 ? (c << 1) ^ 0x04c11db7 : c << 1;
    t[i] = c >>> 0;
  }
  return t;
})();

class Bits {
  private pos = 0;
  private buf = 0;
  private count = 0;
  constructor(private readonly src: Uint8Array) {}
  get(n: number): number {
    while (this.count < n) {
      if (this.pos >= this.src.length) throw new Error('bzip2 stream is truncated');
      this.buf = ((this.buf << 8) | this.src[this.pos++]) >>> 0;
      this.count += 8;
    }
    const v = (this.buf >>> (this.count - n)) & ((1 << n) - 1);
    this.count -= n;
    this.buf &= (1 << this.count) - 1;
    return v;
  }
  bit(): number { return this.get(1); }
  get32(): number { return ((this.get(16) << 16) | this.get(16)) >>> 0; }
  alignByte(): void { this.get(this.count & 7); }
  /** whole bytes left (after alignment) */
  remaining(): number { return this.src.length - this.pos + (this.count >> 3); }
  peekByte(i: number): number { return this.src[this.pos - (this.count >> 3) + i]; }
}

const MAX_CODE_LEN = 20;
const MAX_SELECTORS = 18002;

interface Huff { count: Uint16Array; symbols: Uint16Array }

function buildHuff(lengths: Uint8Array, n: number): Huff {
  const count = new Uint16Array(MAX_CODE_LEN + 1);
  for (let i = 0; i < n; i++) count[lengths[i]]++;
  const offs = new Uint16Array(MAX_CODE_LEN + 2);
  for (let l = 1; l <= MAX_CODE_LEN; l++) offs[l + 1] = offs[l] + count[l];
  const symbols = new Uint16Array(n);
  for (let i = 0; i < n; i++) symbols[offs[lengths[i]]++] = i;
  return { count, symbols };
}

function decodeSym(b: Bits, h: Huff): number {
  let code = 0, first = 0, index = 0;
  for (let len = 1; len <= MAX_CODE_LEN; len++) {
    code |= b.bit();
    const c = h.count[len];
    if (code - first < c) return h.symbols[index + code - first];
    index += c;
    first = (first + c) << 1;
    code <<= 1;
  }
  throw new Error('bzip2: invalid Huffman code');
}

/** Decompresses one or more concatenated bzip2 streams into exactly `outLen` bytes. */
export function bzip2Decompress(src: Uint8Array, outLen: number): Buffer {
  const out = Buffer.alloc(outLen);
  let op = 0;
  const b = new Bits(src);
  let tt: Uint32Array | null = null;
  for (;;) {
    if (b.get(8) !== 0x42 || b.get(8) !== 0x5a || b.get(8) !== 0x68) throw new Error('bzip2: bad stream header');
    const level = b.get(8) - 0x30;
    if (level < 1 || level > 9) throw new Error('bzip2: bad block size');
    const blockMax = level * 100000;
    if (!tt || tt.length < blockMax) tt = new Uint32Array(blockMax);
    let combined = 0;
    for (;;) {
      const m1 = b.get(24), m2 = b.get(24);
      if (m1 === 0x177245 && m2 === 0x385090) {
        const want = b.get32();
        if (want !== combined >>> 0) throw new Error('bzip2: stream CRC mismatch');
        b.alignByte();
        break;
      }
      if (m1 !== 0x314159 || m2 !== 0x265359) throw new Error('bzip2: bad block magic');
      const blockCrc = b.get32();
      if (b.bit()) throw new Error('bzip2: randomised blocks are not supported');
      const origPtr = b.get(24);
      // symbol map
      const used = b.get(16);
      const seqToUnseq = new Uint8Array(256);
      let nInUse = 0;
      for (let i = 0; i < 16; i++) {
        if (!(used & (0x8000 >> i))) continue;
        const bits = b.get(16);
        for (let j = 0; j < 16; j++) if (bits & (0x8000 >> j)) seqToUnseq[nInUse++] = i * 16 + j;
      }
      if (nInUse === 0) throw new Error('bzip2: empty symbol map');
      const alphaSize = nInUse + 2;
      const nGroups = b.get(3);
      if (nGroups < 2 || nGroups > 6) throw new Error('bzip2: bad number of Huffman groups');
      const nSelectors = b.get(15);
      if (nSelectors < 1) throw new Error('bzip2: no selectors');
      const selMtf = new Uint8Array(Math.min(nSelectors, MAX_SELECTORS));
      for (let i = 0; i < nSelectors; i++) {
        let j = 0;
        while (b.bit()) if (++j >= nGroups) throw new Error('bzip2: bad selector');
        if (i < MAX_SELECTORS) selMtf[i] = j;
      }
      const pos = [0, 1, 2, 3, 4, 5];
      const selectors = new Uint8Array(selMtf.length);
      for (let i = 0; i < selMtf.length; i++) {
        let v = selMtf[i];
        const tmp = pos[v];
        while (v > 0) { pos[v] = pos[v - 1]; v--; }
        pos[0] = tmp;
        selectors[i] = tmp;
      }
      const tables: Huff[] = [];
      const lens = new Uint8Array(alphaSize);
      for (let t = 0; t < nGroups; t++) {
        let curr = b.get(5);
        for (let i = 0; i < alphaSize; i++) {
          for (;;) {
            if (curr < 1 || curr > MAX_CODE_LEN) throw new Error('bzip2: bad code length');
            if (!b.bit()) break;
            curr += b.bit() ? -1 : 1;
          }
          lens[i] = curr;
        }
        tables.push(buildHuff(lens, alphaSize));
      }
      // MTF / RLE2 symbols
      const mtf = new Uint8Array(256);
      for (let i = 0; i < 256; i++) mtf[i] = i;
      const counts = new Uint32Array(256);
      const EOB = nInUse + 1;
      let nblock = 0, groupNo = -1, groupLeft = 0;
      let table = tables[0];
      const next = (): number => {
        if (groupLeft === 0) {
          if (++groupNo >= selectors.length) throw new Error('bzip2: ran out of selectors');
          table = tables[selectors[groupNo]];
          groupLeft = 50;
        }
        groupLeft--;
        return decodeSym(b, table);
      };
      let sym = next();
      for (;;) {
        if (sym === EOB) break;
        if (sym <= 1) {
          let run = 0, n = 1;
          do {
            run += sym === 0 ? n : 2 * n;
            n <<= 1;
            if (run > blockMax) throw new Error('bzip2: run exceeds the block size');
            sym = next();
          } while (sym <= 1);
          const uc = seqToUnseq[mtf[0]];
          if (nblock + run > blockMax) throw new Error('bzip2: block exceeds its declared size');
          counts[uc] += run;
          tt.fill(uc, nblock, nblock + run);
          nblock += run;
          continue;
        }
        const idx = sym - 1;
        if (idx >= nInUse) throw new Error('bzip2: bad MTF index');
        const v = mtf[idx];
        mtf.copyWithin(1, 0, idx);
        mtf[0] = v;
        const uc = seqToUnseq[v];
        if (nblock >= blockMax) throw new Error('bzip2: block exceeds its declared size');
        counts[uc]++;
        tt[nblock++] = uc;
        sym = next();
      }
      if (origPtr >= nblock) throw new Error('bzip2: bad BWT origin pointer');
      // inverse BWT
      const cf = new Uint32Array(256);
      for (let i = 0, s = 0; i < 256; i++) { cf[i] = s; s += counts[i]; }
      for (let i = 0; i < nblock; i++) {
        const uc = tt[i] & 0xff;
        tt[cf[uc]++] |= i << 8;
      }
      // RLE1 decode with CRC
      let crc = 0xffffffff;
      let tPos = tt[origPtr] >>> 8;
      let last = -1, runLen = 0;
      for (let k = 0; k < nblock; k++) {
        tPos = tt[tPos];
        const ch = tPos & 0xff;
        tPos >>>= 8;
        if (runLen === 4) {
          if (op + ch > outLen) throw new Error('bzip2: output is larger than declared');
          for (let r = 0; r < ch; r++) {
            out[op++] = last;
            crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ last) & 0xff]) >>> 0;
          }
          runLen = 0;
          last = -1;
          continue;
        }
        if (ch === last) runLen++;
        else { last = ch; runLen = 1; }
        if (op >= outLen) throw new Error('bzip2: output is larger than declared');
        out[op++] = ch;
        crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ ch) & 0xff]) >>> 0;
      }
      crc = ~crc >>> 0;
      if (crc !== blockCrc) throw new Error('bzip2: block CRC mismatch');
      combined = (((combined << 1) | (combined >>> 31)) ^ crc) >>> 0;
    }
    if (b.remaining() < 4 || b.peekByte(0) !== 0x42 || b.peekByte(1) !== 0x5a || b.peekByte(2) !== 0x68) break;
  }
  if (op !== outLen) throw new Error(`bzip2 output is ${op} bytes, expected ${outLen}`);
  return out;
}
