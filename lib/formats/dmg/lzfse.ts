// LZFSE and LZVN decoders (Apple's lossless formats; dmg chunk type 0x80000007), written from
// the stream format of the reference implementation (github.com/lzfse/lzfse, BSD-3): blocks
// "bvx-" (stored), "bvx1"/"bvx2" (LZFSE with plain/packed frequency tables, tANS-coded
// literals and L/M/D triplets), "bvxn" (LZVN), ended by "bvx$". Every count is checked
// against the block limits, the input and the caller's output size.

const MAGIC_EOS = 0x24787662; // bvx$
const MAGIC_RAW = 0x2d787662; // bvx-
const MAGIC_V1 = 0x31787662; // bvx1
const MAGIC_V2 = 0x32787662; // bvx2
const MAGIC_LZVN = 0x6e787662; // bvxn

const L_SYMBOLS = 20, M_SYMBOLS = 20, D_SYMBOLS = 64, LIT_SYMBOLS = 256;
const L_STATES = 64, M_STATES = 64, D_STATES = 256, LIT_STATES = 1024;
const MATCHES_PER_BLOCK = 10000;
const LITERALS_PER_BLOCK = 4 * MATCHES_PER_BLOCK;

const L_EXTRA = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 5, 8];
const L_BASE = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 28, 60];
const M_EXTRA = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 5, 8, 11];
const M_BASE = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 24, 56, 312];
const D_EXTRA: number[] = [];
const D_BASE: number[] = [];
{
  // distance symbol s: s>>2 extra bits (none below 4) over a base that grows with them
  let base = 0;
  for (let s = 0; s < D_SYMBOLS; s++) {
    const extra = s < 4 ? 0 : s >> 2;
    D_EXTRA.push(extra);
    D_BASE.push(base);
    base += 1 << extra;
  }
}

function fail(msg: string): never { throw new Error(`LZFSE: ${msg}`); }

const clz32 = Math.clz32;

/** tANS decoder table for literals: per state k (bits), symbol, delta */
function literalTable(freq: Uint16Array): { k: Uint8Array; sym: Uint8Array; delta: Int32Array } {
  const k = new Uint8Array(LIT_STATES), sym = new Uint8Array(LIT_STATES), delta = new Int32Array(LIT_STATES);
  const nClz = clz32(LIT_STATES);
  let t = 0;
  for (let i = 0; i < LIT_SYMBOLS; i++) {
    const f = freq[i];
    if (!f) continue;
    const kk = clz32(f) - nClz;
    const j0 = ((2 * LIT_STATES) >> kk) - f;
    for (let j = 0; j < f; j++, t++) {
      sym[t] = i;
      if (j < j0) { k[t] = kk; delta[t] = ((f + j) << kk) - LIT_STATES; }
      else { k[t] = kk - 1; delta[t] = (j - j0) << (kk - 1); }
    }
  }
  return { k, sym, delta };
}

interface ValueTable { total: Uint8Array; vbits: Uint8Array; delta: Int32Array; vbase: Int32Array }
function valueTable(nStates: number, freq: Uint16Array, extra: number[], base: number[]): ValueTable {
  const total = new Uint8Array(nStates), vbits = new Uint8Array(nStates), delta = new Int32Array(nStates), vbase = new Int32Array(nStates);
  const nClz = clz32(nStates);
  let t = 0;
  for (let i = 0; i < freq.length; i++) {
    const f = freq[i];
    if (!f) continue;
    const kk = clz32(f) - nClz;
    const j0 = ((2 * nStates) >> kk) - f;
    for (let j = 0; j < f; j++, t++) {
      vbits[t] = extra[i];
      vbase[t] = base[i];
      if (j < j0) { total[t] = kk + extra[i]; delta[t] = ((f + j) << kk) - nStates; }
      else { total[t] = kk - 1 + extra[i]; delta[t] = (j - j0) << (kk - 1); }
    }
  }
  return { total, vbits, delta, vbase };
}

function checkFreq(freq: Uint16Array, nStates: number): void {
  let s = 0;
  for (const f of freq) s += f;
  if (s > nStates) fail('frequency table exceeds the state count');
}

/** A backwards bit reader: bytes are consumed from the end towards `start`; 24..31 bits kept. */
class BackBits {
  accum = 0;
  nbits = 0;
  constructor(private readonly src: Uint8Array, public pos: number, start: number, n: number) {
    // n in [-7, 0]: the final byte holds only 8+n valid bits
    if (n) {
      if (pos < start + 4) fail('bit stream too short');
      this.pos -= 4;
      this.accum = (src[this.pos] | (src[this.pos + 1] << 8) | (src[this.pos + 2] << 16) | (src[this.pos + 3] << 24)) >>> 0;
      this.nbits = n + 32;
    } else {
      if (pos < start + 3) fail('bit stream too short');
      this.pos -= 3;
      this.accum = src[this.pos] | (src[this.pos + 1] << 8) | (src[this.pos + 2] << 16);
      this.nbits = 24;
    }
    if (this.nbits < 24 || this.nbits >= 32 || (this.nbits < 32 && this.accum >>> this.nbits) !== 0) fail('bad bit stream start');
  }
  flush(): void {
    const n = (31 - this.nbits) & ~7;
    if (n <= 0) return;
    const bytes = n >> 3;
    // as the reference decoder: refills may reach back into the bytes before the payload
    // (they are shifted in but never consumed by a valid stream); never before the input
    if (this.pos - bytes < 0) fail('bit stream underflow');
    this.pos -= bytes;
    let incoming = 0;
    for (let i = bytes - 1; i >= 0; i--) incoming = (incoming << 8) | this.src[this.pos + i];
    this.accum = ((this.accum << n) | incoming) >>> 0;
    this.nbits += n;
  }
  pull(n: number): number {
    if (n > this.nbits) fail('bit stream exhausted');
    this.nbits -= n;
    const r = this.accum >>> this.nbits;
    this.accum = this.nbits === 0 ? 0 : (this.accum & ((1 << this.nbits) - 1)) >>> 0;
    return r;
  }
}

function u32(b: Uint8Array, o: number): number { return (b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24)) >>> 0; }
function u16(b: Uint8Array, o: number): number { return b[o] | (b[o + 1] << 8); }

function freqValue(bits: number): [number, number] {
  const NB = [2, 3, 2, 5, 2, 3, 2, 8, 2, 3, 2, 5, 2, 3, 2, 14, 2, 3, 2, 5, 2, 3, 2, 8, 2, 3, 2, 5, 2, 3, 2, 14];
  const VAL = [0, 2, 1, 4, 0, 3, 1, -1, 0, 2, 1, 5, 0, 3, 1, -1, 0, 2, 1, 6, 0, 3, 1, -1, 0, 2, 1, 7, 0, 3, 1, -1];
  const b = bits & 31;
  const n = NB[b];
  if (n === 8) return [8 + ((bits >>> 4) & 0xf), n];
  if (n === 14) return [24 + ((bits >>> 4) & 0x3ff), n];
  return [VAL[b], n];
}

interface BlockHeader {
  nRaw: number; nLiterals: number; nMatches: number; nLitPayload: number; nLmdPayload: number;
  literalBits: number; litState: number[]; lmdBits: number; lState: number; mState: number; dState: number;
  lFreq: Uint16Array; mFreq: Uint16Array; dFreq: Uint16Array; litFreq: Uint16Array; headerSize: number;
}

function readHeader(src: Uint8Array, p: number, magic: number): BlockHeader {
  const lFreq = new Uint16Array(L_SYMBOLS), mFreq = new Uint16Array(M_SYMBOLS), dFreq = new Uint16Array(D_SYMBOLS), litFreq = new Uint16Array(LIT_SYMBOLS);
  const all = [lFreq, mFreq, dFreq, litFreq];
  if (magic === MAGIC_V1) {
    const size = 50 + 2 * (L_SYMBOLS + M_SYMBOLS + D_SYMBOLS + LIT_SYMBOLS);
    if (p + size > src.length) fail('truncated block header');
    let o = p + 50;
    for (const a of all) for (let i = 0; i < a.length; i++, o += 2) a[i] = u16(src, o);
    const s32 = (x: number): number => u32(src, x) | 0;
    return {
      nRaw: u32(src, p + 4), nLiterals: u32(src, p + 12), nMatches: u32(src, p + 16), nLitPayload: u32(src, p + 20), nLmdPayload: u32(src, p + 24),
      literalBits: s32(p + 28), litState: [u16(src, p + 32), u16(src, p + 34), u16(src, p + 36), u16(src, p + 38)],
      lmdBits: s32(p + 40), lState: u16(src, p + 44), mState: u16(src, p + 46), dState: u16(src, p + 48),
      lFreq, mFreq, dFreq, litFreq, headerSize: size,
    };
  }
  if (p + 32 > src.length) fail('truncated block header');
  const f = (word: number, off: number, n: number): number => {
    const lo = u32(src, p + 8 + word * 8), hi = u32(src, p + 12 + word * 8);
    const v = (BigInt(hi) << 32n) | BigInt(lo);
    return Number((v >> BigInt(off)) & ((1n << BigInt(n)) - 1n));
  };
  const headerSize = f(2, 0, 32);
  if (headerSize < 32 || p + headerSize > src.length) fail('bad block header size');
  const h: BlockHeader = {
    nRaw: u32(src, p + 4), nLiterals: f(0, 0, 20), nLitPayload: f(0, 20, 20), nMatches: f(0, 40, 20), literalBits: f(0, 60, 3) - 7,
    litState: [f(1, 0, 10), f(1, 10, 10), f(1, 20, 10), f(1, 30, 10)], nLmdPayload: f(1, 40, 20), lmdBits: f(1, 60, 3) - 7,
    lState: f(2, 32, 10), mState: f(2, 42, 10), dState: f(2, 52, 10), lFreq, mFreq, dFreq, litFreq, headerSize,
  };
  let o = p + 32;
  const end = p + headerSize;
  if (o < end) {
    let accum = 0, nb = 0;
    for (const a of all) {
      for (let i = 0; i < a.length; i++) {
        while (o < end && nb + 8 <= 32) { accum = (accum | (src[o++] << nb)) >>> 0; nb += 8; }
        const [v, n] = freqValue(accum);
        if (n > nb) fail('bad frequency tables');
        a[i] = v;
        accum = nb - n >= 32 ? accum : accum >>> n;
        nb -= n;
      }
    }
    if (nb >= 8 || o !== end) fail('bad frequency table size');
  }
  return h;
}

function decodeLzfseBlock(src: Uint8Array, p: number, magic: number, out: Uint8Array, op: number): [number, number] {
  const h = readHeader(src, p, magic);
  if (h.nLiterals > LITERALS_PER_BLOCK || h.nMatches > MATCHES_PER_BLOCK) fail('block counts out of range');
  if (h.litState.some((s) => s >= LIT_STATES) || h.lState >= L_STATES || h.mState >= M_STATES || h.dState >= D_STATES) fail('bad initial state');
  if (h.literalBits < -7 || h.literalBits > 0 || h.lmdBits < -7 || h.lmdBits > 0) fail('bad bit counts');
  checkFreq(h.lFreq, L_STATES); checkFreq(h.mFreq, M_STATES); checkFreq(h.dFreq, D_STATES); checkFreq(h.litFreq, LIT_STATES);
  const start = p + h.headerSize;
  if (start + h.nLitPayload + h.nLmdPayload > src.length) fail('truncated block payload');
  if (op + h.nRaw > out.length) fail('output is larger than declared');
  // literals: four interleaved tANS states, read backwards
  const lt = literalTable(h.litFreq);
  const literals = new Uint8Array(h.nLiterals + 4);
  {
    const litEnd = start + h.nLitPayload;
    const bits = new BackBits(src, litEnd, start, h.literalBits);
    const st = h.litState.slice();
    if (h.nLiterals % 4) fail('literal count is not a multiple of 4');
    for (let i = 0; i < h.nLiterals; i += 4) {
      bits.flush();
      for (let k = 0; k < 4; k++) {
        if (k === 2) bits.flush();
        const s = st[k];
        literals[i + k] = lt.sym[s];
        st[k] = lt.delta[s] + bits.pull(lt.k[s]);
        if (st[k] >= LIT_STATES) fail('bad literal state');
      }
    }
  }
  // L, M, D triplets
  const lmdStart = start + h.nLitPayload;
  const bits = new BackBits(src, lmdStart + h.nLmdPayload, lmdStart, h.lmdBits);
  const ltab = valueTable(L_STATES, h.lFreq, L_EXTRA, L_BASE);
  const mtab = valueTable(M_STATES, h.mFreq, M_EXTRA, M_BASE);
  const dtab = valueTable(D_STATES, h.dFreq, D_EXTRA, D_BASE);
  let ls = h.lState, ms = h.mState, ds = h.dState;
  const value = (t: ValueTable, s: number, n: number): [number, number] => {
    bits.flush();
    const v = bits.pull(t.total[s]);
    const ns = t.delta[s] + (t.vbits[s] ? v >>> t.vbits[s] : v);
    if (ns >= n || ns < 0) fail('bad L/M/D state');
    return [t.vbase[s] + (v & ((1 << t.vbits[s]) - 1)), ns];
  };
  let lit = 0;
  let D = -1;
  const blockEnd = op + h.nRaw;
  for (let m = 0; m < h.nMatches; m++) {
    let L: number, M: number, nd: number;
    [L, ls] = value(ltab, ls, L_STATES);
    [M, ms] = value(mtab, ms, M_STATES);
    [nd, ds] = value(dtab, ds, D_STATES);
    if (nd) D = nd;
    if (lit + L > h.nLiterals) fail('literal run past the literals');
    if (op + L + M > blockEnd) fail('match past the block end');
    out.set(literals.subarray(lit, lit + L), op);
    op += L;
    lit += L;
    if (M) {
      if (D <= 0 || D > op) fail('bad match distance');
      if (D >= M) out.copyWithin(op, op - D, op - D + M);
      else for (let i = 0; i < M; i++) out[op + i] = out[op + i - D];
      op += M;
    }
  }
  if (op !== blockEnd) fail(`block decoded to ${op - (blockEnd - h.nRaw)} bytes, expected ${h.nRaw}`);
  return [lmdStart + h.nLmdPayload, op];
}

/** LZVN: byte-oriented opcodes with literal length L, match length M and distance D. */
export function lzvnDecode(src: Uint8Array, sp: number, send: number, out: Uint8Array, op: number, oend: number): [number, number] {
  let D = 0;
  const need = (n: number): void => { if (sp + n > send) fail('LZVN input truncated'); };
  for (;;) {
    need(1);
    const opc = src[sp];
    let L = 0, M = 0, len = 1;
    const low = opc & 7;
    const hi4 = opc >> 4;
    if (opc === 0x06) return [sp + 8 <= send ? sp + 8 : fail('LZVN truncated end marker'), op];
    if (opc === 0x0e || opc === 0x16) { sp++; continue; }
    if ((opc >= 0x70 && opc <= 0x7f) || (opc >= 0xd0 && opc <= 0xdf) || (opc < 0x40 && low === 6)) fail(`LZVN undefined opcode 0x${opc.toString(16)}`);
    if (hi4 === 0xe) {
      // literal only
      if (opc === 0xe0) { need(2); L = src[sp + 1] + 16; len = 2; } else L = opc & 0xf;
      need(len + L);
      if (op + L > oend) fail('LZVN output past the block end');
      out.set(src.subarray(sp + len, sp + len + L), op);
      sp += len + L;
      op += L;
      continue;
    }
    if (hi4 === 0xf) {
      if (opc === 0xf0) { need(2); M = src[sp + 1] + 16; len = 2; } else M = opc & 0xf;
      sp += len;
    } else {
      if (opc >= 0xa0 && opc <= 0xbf) {
        len = 3; need(3);
        L = (opc >> 3) & 3;
        const w = src[sp + 1] | (src[sp + 2] << 8);
        M = (((opc & 7) << 2) | (w & 3)) + 3;
        D = w >> 2;
      } else {
        L = opc >> 6;
        M = ((opc >> 3) & 7) + 3;
        if (low === 7) { len = 3; need(3); D = src[sp + 1] | (src[sp + 2] << 8); }
        else if (low === 6) len = 1;
        else { len = 2; need(2); D = ((opc & 7) << 8) | src[sp + 1]; }
      }
      need(len + L);
      if (op + L > oend) fail('LZVN output past the block end');
      out.set(src.subarray(sp + len, sp + len + L), op);
      sp += len + L;
      op += L;
    }
    if (D <= 0 || D > op) fail('LZVN bad match distance');
    if (op + M > oend) fail('LZVN output past the block end');
    for (let i = 0; i < M; i++) out[op + i] = out[op + i - D];
    op += M;
  }
}

/** Decompresses an LZFSE stream into exactly `outLen` bytes. */
export function lzfseDecompress(src: Uint8Array, outLen: number): Buffer {
  const out = Buffer.alloc(outLen);
  let p = 0, op = 0;
  for (;;) {
    if (p + 4 > src.length) fail('stream truncated (no end marker)');
    const magic = u32(src, p);
    if (magic === MAGIC_EOS) break;
    if (magic === MAGIC_RAW) {
      if (p + 8 > src.length) fail('truncated block header');
      const n = u32(src, p + 4);
      if (p + 8 + n > src.length) fail('stored block truncated');
      if (op + n > outLen) fail('output is larger than declared');
      out.set(src.subarray(p + 8, p + 8 + n), op);
      op += n;
      p += 8 + n;
    } else if (magic === MAGIC_LZVN) {
      if (p + 12 > src.length) fail('truncated block header');
      const nRaw = u32(src, p + 4), nPayload = u32(src, p + 8);
      if (p + 12 + nPayload > src.length) fail('LZVN block truncated');
      if (op + nRaw > outLen) fail('output is larger than declared');
      const [, end] = lzvnDecode(src, p + 12, p + 12 + nPayload, out, op, op + nRaw);
      if (end !== op + nRaw) fail('LZVN block size mismatch');
      op = end;
      p += 12 + nPayload;
    } else if (magic === MAGIC_V1 || magic === MAGIC_V2) {
      [p, op] = decodeLzfseBlock(src, p, magic, out, op);
    } else fail(`bad block magic 0x${magic.toString(16)}`);
  }
  if (op !== outLen) fail(`output is ${op} bytes, expected ${outLen}`);
  return out;
}
