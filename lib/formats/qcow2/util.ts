// Small helpers for the qcow2 driver: an async mutex, a byte-bounded LRU, entry decoding.
import { ImgError } from '../../core/errors';

export { Mutex } from '../../core/mutex';

/** LRU of table buffers keyed by host offset, bounded in bytes. Entries are always clean
 *  (tables are written through), so eviction only drops memory. */
export class TableCache {
  private map = new Map<number, Buffer>();
  private loading = new Map<number, Promise<Buffer>>();
  private bytes = 0;
  constructor(private maxBytes: number) {}

  get(off: number): Buffer | undefined {
    const b = this.map.get(off);
    if (b) { this.map.delete(off); this.map.set(off, b); }
    return b;
  }

  set(off: number, b: Buffer): void {
    const old = this.map.get(off);
    if (old) { this.bytes -= old.length; this.map.delete(off); }
    this.map.set(off, b);
    this.bytes += b.length;
    while (this.bytes > this.maxBytes && this.map.size > 1) {
      const k = this.map.keys().next().value as number;
      this.bytes -= this.map.get(k)!.length;
      this.map.delete(k);
    }
  }

  drop(off: number): void {
    const b = this.map.get(off);
    if (b) { this.bytes -= b.length; this.map.delete(off); }
  }

  clear(): void { this.map.clear(); this.bytes = 0; }

  async load(off: number, size: number, read: (b: Buffer, off: number) => Promise<void>): Promise<Buffer> {
    const hit = this.get(off);
    if (hit) return hit;
    let p = this.loading.get(off);
    if (!p) {
      p = (async () => {
        const b = Buffer.alloc(size);
        await read(b, off);
        this.set(off, b);
        return b;
      })().finally(() => this.loading.delete(off));
      this.loading.set(off, p);
    }
    return p;
  }
}

export const OFLAG_COPIED = 0x80000000;
export const OFLAG_COMPRESSED = 0x40000000;

/** The 56-bit offset field (bits 9..55) of an L1/L2 entry given as two big-endian words. */
export function entryOffset(hi: number, lo: number): number {
  const h = hi & 0x00ffffff;
  if (h >= 0x200000) throw new ImgError('image', 'qcow2: table entry offset is out of range');
  return h * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
}

export function readEntry(b: Buffer, at: number): [number, number] {
  return [b.readUInt32BE(at), b.readUInt32BE(at + 4)];
}

export function writeEntry(b: Buffer, at: number, offset: number, flagsHi: number, flagsLo = 0): void {
  const hi = Math.floor(offset / 0x100000000);
  const lo = offset % 0x100000000;
  b.writeUInt32BE(((hi | flagsHi) >>> 0), at);
  b.writeUInt32BE(((lo | flagsLo) >>> 0), at + 4);
}

/** Refcount entry accessors for refcount_order 0..6 (qemu's get/set_refcount_ro*). */
export function getRef(block: Buffer, i: number, order: number): number {
  switch (order) {
    case 0: return (block[i >> 3] >> (i & 7)) & 1;
    case 1: return (block[i >> 2] >> (2 * (i & 3))) & 3;
    case 2: return (block[i >> 1] >> (4 * (i & 1))) & 15;
    case 3: return block[i];
    case 4: return block.readUInt16BE(i * 2);
    case 5: return block.readUInt32BE(i * 4);
    default: {
      const v = block.readBigUInt64BE(i * 8);
      return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
    }
  }
}

export function setRef(block: Buffer, i: number, order: number, v: number): void {
  switch (order) {
    case 0: block[i >> 3] = (block[i >> 3] & ~(1 << (i & 7))) | (v << (i & 7)); break;
    case 1: { const s = 2 * (i & 3); block[i >> 2] = (block[i >> 2] & ~(3 << s)) | (v << s); break; }
    case 2: { const s = 4 * (i & 1); block[i >> 1] = (block[i >> 1] & ~(15 << s)) | (v << s); break; }
    case 3: block[i] = v; break;
    case 4: block.writeUInt16BE(v, i * 2); break;
    case 5: block.writeUInt32BE(v, i * 4); break;
    default: block.writeBigUInt64BE(BigInt(v), i * 8);
  }
}

/** byte range of a refcount entry inside its block (for partial writes) */
export function refByteRange(i: number, order: number): [number, number] {
  if (order <= 3) { const b = (i << order) >> 3; return [b, b + 1]; }
  const w = 1 << (order - 3);
  return [i * w, i * w + w];
}

const ZEROS = Buffer.alloc(65536);

/** [start, end) of b holds only zero bytes (a bulk test: a byte loop is slow until V8 optimises it) */
export function allZero(b: Buffer, start: number, end: number): boolean {
  for (let p = start; p < end; p += ZEROS.length) {
    const n = Math.min(ZEROS.length, end - p);
    if (ZEROS.compare(b, p, p + n, 0, n) !== 0) return false;
  }
  return true;
}

/** the host offsets of the non-zero 8-byte entries among the first `count` of a table (L1,
 *  refcount table), in order; runs of empty entries are skipped in bulk, as most are empty */
export function tableOffsets(b: Buffer, count: number): number[] {
  const out: number[] = [];
  const end = Math.min(count * 8, b.length);
  const CHUNK = 512;
  for (let c = 0; c < end; c += CHUNK) {
    const ce = Math.min(end, c + CHUNK);
    if (allZero(b, c, ce)) continue;
    for (let at = c; at < ce; at += 8) {
      const off = entryOffset(b.readUInt32BE(at), b.readUInt32BE(at + 4));
      if (off) out.push(off);
    }
  }
  return out;
}

export const maxRef = (order: number): number => (order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1);
