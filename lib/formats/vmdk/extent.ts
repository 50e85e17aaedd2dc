// VMDK extents: flat (FLAT/VMFS), zero (ZERO), and sparse ones (hosted KDMV incl.
// streamOptimized, ESX COWD, seSparse) with a bounded grain-table cache.
import zlib from 'node:zlib';
import { ImgError } from '../../core/errors';
import type { BlockNode } from '../../core/node';
import { Mutex } from '../../core/mutex';
import {
  checkSeSparseVolatile, COMPRESSION_DEFLATE, FLAG_COMPRESS, FLAG_MARKER, FLAG_NL_DETECT, FLAG_RGD, FLAG_ZERO_GRAIN,
  MARKER_EOS, MARKER_FOOTER, MARKER_GD, MARKER_GT, markerSector, MAX_CAPACITY_SECTORS, MAX_GRAIN_SECTORS, MAX_L1_ENTRIES,
  parseCowd, parseSeSparse, parseVmdk4, SECTOR, serializeVmdk4, Vmdk4Header, VMDK3_MAGIC, VMDK4_MAGIC,
} from './header';

export type State = 'data' | 'zero' | 'unallocated';
export interface Mapping {
  state: State;
  /** bytes from the queried offset that share this mapping (up to the grain end) */
  length: number;
  /** host byte offset of the queried byte (uncompressed data only) */
  host?: number;
  compressed?: boolean;
}

/** grain-table cache size per extent (tests shrink it to force evictions) */
export const tuning = { gtCacheBytes: 4 << 20 };
const MAX_STREAM_GT_BYTES = 64 << 20;

export abstract class VmdkExtent {
  /** guest byte offset where the extent begins */
  start = 0;
  constructor(readonly file: BlockNode, readonly size: number, public type: string, readonly readOnly: boolean) {}
  abstract readonly flat: boolean;
  compressed = false;
  /** grain size in bytes; the extent size for flat extents */
  abstract readonly clusterSize: number;
  abstract map(rel: number, max: number): Promise<Mapping>;
  abstract read(buf: Uint8Array, rel: number): Promise<void>;
  /** true when the whole range is written in place (allocated, uncompressed) */
  abstract writeInPlace(buf: Uint8Array, rel: number): Promise<boolean>;
  async finish(): Promise<void> { /* nothing to finalise */ }
}

export class FlatExtent extends VmdkExtent {
  readonly flat = true;
  constructor(file: BlockNode, size: number, type: string, readOnly: boolean, readonly offset: number) {
    super(file, size, type, readOnly);
  }
  get clusterSize(): number { return this.size; }
  async map(rel: number, max: number): Promise<Mapping> {
    return { state: 'data', length: Math.min(max, this.size - rel), host: this.offset + rel };
  }
  read(buf: Uint8Array, rel: number): Promise<void> { return this.file.read(buf, this.offset + rel); }
  async writeInPlace(buf: Uint8Array, rel: number): Promise<boolean> {
    if (this.readOnly) throw new ImgError('readonly', `vmdk: extent '${this.file.filename}' is read-only`);
    await this.file.write!(buf, this.offset + rel);
    return true;
  }
}

export class ZeroExtent extends VmdkExtent {
  readonly flat = true;
  get clusterSize(): number { return this.size; }
  async map(rel: number, max: number): Promise<Mapping> { return { state: 'zero', length: Math.min(max, this.size - rel) }; }
  async read(buf: Uint8Array): Promise<void> { buf.fill(0); }
  async writeInPlace(): Promise<boolean> { throw new ImgError('unsupported', 'vmdk: cannot write to a ZERO extent'); }
}

type Kind = 'vmdk4' | 'cowd' | 'se';

/** LRU of grain tables, bounded in bytes */
class GtCache {
  private m = new Map<number, Uint32Array | BigUint64Array>();
  constructor(private maxEntries: number) {}
  get(k: number): Uint32Array | BigUint64Array | undefined {
    const v = this.m.get(k);
    if (v) { this.m.delete(k); this.m.set(k, v); }
    return v;
  }
  set(k: number, v: Uint32Array | BigUint64Array): void {
    this.m.delete(k);
    this.m.set(k, v);
    while (this.m.size > this.maxEntries) this.m.delete(this.m.keys().next().value as number);
  }
}


export interface SparseParams {
  kind: Kind;
  size: number;
  grainSectors: number;
  gtEntries: number;
  l1Entries: number;
  gdOffset: number;
  rgdOffset: number;
  hasZeroGrain: boolean;
  compressed: boolean;
  hasMarker: boolean;
  version: number;
  header?: Vmdk4Header;
  seGtOffset?: number;
  seGrainsOffset?: number;
  /** the extent file holds the disk's own descriptor (monolithic) */
  descOffset: number;
  descSize: number;
}

export class SparseExtent extends VmdkExtent {
  readonly flat = false;
  readonly clusterSize: number;
  readonly kind: Kind;
  readonly gtEntries: number;
  readonly entrySize: number;
  readonly gtBytes: number;
  l1!: Uint32Array | BigUint64Array;
  l1b: Uint32Array | null = null;
  private cache: GtCache;
  private gtLock = new Mutex();
  nextAlloc: number;
  readonly p: SparseParams;
  /** streamOptimized writing: all grain tables in memory, the append point, the grain being filled */
  private streamGts: Map<number, Uint32Array> | null = null;
  private appendAt = 0;
  private pending: { idx: number; buf: Buffer } | null = null;
  private streamDirty = false;
  private lastGrain: { host: number; data: Buffer } | null = null;
  /** the backing data for grains first written here (set by the node) */
  backingRead: ((buf: Buffer, rel: number) => Promise<void>) | null = null;

  constructor(file: BlockNode, type: string, readOnly: boolean, p: SparseParams) {
    super(file, p.size, type, readOnly);
    this.p = p;
    this.kind = p.kind;
    this.clusterSize = p.grainSectors * SECTOR;
    this.gtEntries = p.gtEntries;
    this.entrySize = p.kind === 'se' ? 8 : 4;
    this.gtBytes = this.gtEntries * this.entrySize;
    this.compressed = p.compressed;
    this.cache = new GtCache(Math.max(2, Math.floor(tuning.gtCacheBytes / this.gtBytes)));
    this.nextAlloc = Math.ceil(file.size / this.clusterSize) * this.clusterSize;
  }

  get grainsPerGt(): number { return this.gtEntries; }

  async init(): Promise<void> {
    const n = this.p.l1Entries;
    const bytes = n * this.entrySize;
    if (this.p.gdOffset + bytes > this.file.size) throw new ImgError('image', `vmdk: grain directory of '${this.file.filename}' is beyond the end of the file`);
    const b = Buffer.alloc(bytes);
    if (bytes) await this.file.read(b, this.p.gdOffset);
    this.l1 = this.entrySize === 8 ? new BigUint64Array(n) : new Uint32Array(n);
    for (let i = 0; i < n; i++) {
      if (this.entrySize === 8) (this.l1 as BigUint64Array)[i] = b.readBigUInt64LE(i * 8);
      else (this.l1 as Uint32Array)[i] = b.readUInt32LE(i * 4);
    }
    if (this.p.rgdOffset) {
      if (this.p.rgdOffset + bytes > this.file.size) throw new ImgError('image', `vmdk: redundant grain directory of '${this.file.filename}' is beyond the end of the file`);
      const r = Buffer.alloc(bytes);
      if (bytes) await this.file.read(r, this.p.rgdOffset);
      this.l1b = new Uint32Array(n);
      for (let i = 0; i < n; i++) this.l1b[i] = r.readUInt32LE(i * 4);
    }
    if (this.compressed && !this.readOnly) await this.initStream();
  }

  /** byte offset of the grain table for GD index i, 0 if none */
  gtOffset(i: number): number {
    if (this.kind === 'se') {
      const v = (this.l1 as BigUint64Array)[i];
      if (v === 0n) return 0;
      if ((v & 0xffffffff00000000n) !== 0x1000000000000000n) throw new ImgError('image', `vmdk: seSparse: invalid grain directory entry ${i}`);
      const sec = this.p.seGtOffset! + Number(v & 0xffffffffn) * this.gtBytes / SECTOR;
      if (sec > 0xffffffff) throw new ImgError('image', `vmdk: seSparse: grain table ${i} out of range`);
      return sec * SECTOR;
    }
    return (this.l1 as Uint32Array)[i] * SECTOR;
  }

  async loadGt(off: number): Promise<Uint32Array | BigUint64Array> {
    const hit = this.cache.get(off);
    if (hit) return hit;
    // misses are read under the table lock, so a load never races with an entry update
    return this.gtLock.lock(async () => this.cache.get(off) ?? this.readGt(off));
  }

  private async readGt(off: number): Promise<Uint32Array | BigUint64Array> {
    if (off + this.gtBytes > this.file.size) throw new ImgError('image', `vmdk: grain table at offset ${off} of '${this.file.filename}' is beyond the end of the file`);
    const b = Buffer.alloc(this.gtBytes);
    await this.file.read(b, off);
    let t: Uint32Array | BigUint64Array;
    if (this.entrySize === 8) {
      t = new BigUint64Array(this.gtEntries);
      for (let i = 0; i < this.gtEntries; i++) t[i] = b.readBigUInt64LE(i * 8);
    } else {
      t = new Uint32Array(this.gtEntries);
      for (let i = 0; i < this.gtEntries; i++) t[i] = b.readUInt32LE(i * 4);
    }
    this.cache.set(off, t);
    return t;
  }

  /** grain index -> 'unalloc' | 'zero' | host byte offset of the grain */
  async lookup(g: number): Promise<number | 'unalloc' | 'zero'> {
    if (this.pending && this.pending.idx === g) return -1;
    const l1i = Math.floor(g / this.gtEntries);
    if (l1i >= this.l1.length) throw new ImgError('image', `vmdk: grain ${g} is outside the grain directory`);
    const l2i = g % this.gtEntries;
    let gt: Uint32Array | BigUint64Array | undefined = this.streamGts?.get(l1i);
    if (!gt) {
      const off = this.gtOffset(l1i);
      if (!off) return 'unalloc';
      gt = await this.loadGt(off);
    }
    if (this.kind === 'se') {
      const e = (gt as BigUint64Array)[l2i];
      switch (e >> 60n) {
        case 0n:
          if (e !== 0n) throw new ImgError('image', `vmdk: seSparse: invalid grain table entry for grain ${g}`);
          return 'unalloc';
        case 1n: case 2n: return 'zero';
        case 3n: {
          const idx = ((e & 0x0fff000000000000n) >> 48n) | ((e & 0x0000ffffffffffffn) << 12n);
          const sec = BigInt(this.p.seGrainsOffset!) + idx * BigInt(this.p.grainSectors);
          if (sec * 512n > BigInt(Number.MAX_SAFE_INTEGER)) throw new ImgError('image', `vmdk: seSparse: grain ${g} out of range`);
          return Number(sec) * SECTOR;
        }
        default: throw new ImgError('image', `vmdk: seSparse: invalid grain table entry for grain ${g}`);
      }
    }
    const e = (gt as Uint32Array)[l2i];
    if (e === 0) return 'unalloc';
    if (e === 1 && this.p.hasZeroGrain) return 'zero';
    return e * SECTOR;
  }

  async map(rel: number, max: number): Promise<Mapping> {
    const cs = this.clusterSize;
    const g = Math.floor(rel / cs);
    const inG = rel - g * cs;
    const len = Math.min(max, cs - inG, this.size - rel);
    const r = await this.lookup(g);
    if (r === 'unalloc') return { state: 'unallocated', length: len };
    if (r === 'zero') return { state: 'zero', length: len };
    if (this.compressed) return { state: 'data', length: len, compressed: true };
    return { state: 'data', length: len, host: r + inG };
  }

  async read(buf: Uint8Array, rel: number): Promise<void> {
    const cs = this.clusterSize;
    let done = 0;
    while (done < buf.length) {
      const o = rel + done;
      const g = Math.floor(o / cs);
      const inG = o - g * cs;
      const n = Math.min(buf.length - done, cs - inG);
      const sub = buf.subarray(done, done + n);
      if (this.pending && this.pending.idx === g) {
        sub.set(this.pending.buf.subarray(inG, inG + n));
      } else {
        const r = await this.lookup(g);
        if (r === 'unalloc' || r === 'zero') sub.fill(0);
        else if (this.compressed) {
          const data = await this.readCompressed(r, g);
          if (inG + n > data.length) throw new ImgError('image', `vmdk: compressed grain ${g} of '${this.file.filename}' is too short`);
          sub.set(data.subarray(inG, inG + n));
        } else await this.file.read(sub, r + inG);
      }
      done += n;
    }
  }

  private async readCompressed(host: number, g: number): Promise<Buffer> {
    if (this.lastGrain && this.lastGrain.host === host) return this.lastGrain.data;
    const cs = this.clusterSize;
    const avail = Math.min(cs * 2, this.file.size - host);
    if (avail <= (this.p.hasMarker ? 12 : 0)) throw new ImgError('image', `vmdk: compressed grain ${g} of '${this.file.filename}' is beyond the end of the file`);
    const b = Buffer.alloc(avail);
    await this.file.read(b, host);
    let data: Buffer = b;
    if (this.p.hasMarker) {
      const size = b.readUInt32LE(8);
      if (size === 0 || size > avail - 12) throw new ImgError('image', `vmdk: invalid compressed grain marker for grain ${g} of '${this.file.filename}'`);
      data = b.subarray(12, 12 + size);
    }
    let out: Buffer;
    try {
      out = zlib.inflateSync(data, { maxOutputLength: cs, finishFlush: zlib.constants.Z_SYNC_FLUSH });
    } catch (e) {
      throw new ImgError('image', `vmdk: cannot decompress grain ${g} of '${this.file.filename}': ${(e as Error).message.split('\n')[0]}`);
    }
    this.lastGrain = { host, data: out };
    return out;
  }

  async writeInPlace(buf: Uint8Array, rel: number): Promise<boolean> {
    if (this.readOnly) throw new ImgError('readonly', `vmdk: extent '${this.file.filename}' is read-only`);
    if (this.compressed) return false;
    const cs = this.clusterSize;
    // every grain of the range must be allocated
    const first = Math.floor(rel / cs);
    const last = Math.floor((rel + buf.length - 1) / cs);
    const hosts: number[] = [];
    for (let g = first; g <= last; g++) {
      const r = await this.lookup(g);
      if (typeof r !== 'number') return false;
      hosts.push(r);
    }
    let done = 0;
    for (let g = first; g <= last; g++) {
      const o = rel + done;
      const inG = o - g * cs;
      const n = Math.min(buf.length - done, cs - inG);
      await this.file.write!(buf.subarray(done, done + n), hosts[g - first] + inG);
      done += n;
    }
    return true;
  }

  private async setEntry(g: number, value: number): Promise<void> {
    const l1i = Math.floor(g / this.gtEntries);
    const l2i = g % this.gtEntries;
    let off = this.gtOffset(l1i);
    if (!off) off = await this.allocGt(l1i);
    const gt = (await this.loadGt(off)) as Uint32Array;
    const b = Buffer.alloc(4);
    b.writeUInt32LE(value >>> 0, 0);
    await this.gtLock.lock(async () => {
      await this.file.write!(b, off + l2i * 4);
      if (this.l1b) {
        const boff = this.l1b[l1i] * SECTOR;
        if (boff && boff + this.gtBytes <= this.file.size) await this.file.write!(b, boff + l2i * 4);
      }
      gt[l2i] = value >>> 0;
      const cur = this.cache.get(off) as Uint32Array | undefined;
      if (cur) cur[l2i] = value >>> 0;
    });
  }

  /** a new, empty grain table (and its redundant copy) for GD index l1i, in grain-sized slots */
  private async allocGt(l1i: number): Promise<number> {
    if (this.kind === 'se' || this.compressed) throw new ImgError('unsupported', 'vmdk: cannot allocate grain tables here');
    const slot = Math.ceil(this.gtBytes / this.clusterSize) * this.clusterSize;
    const place = async (gdBase: number): Promise<number> => {
      if (this.nextAlloc / SECTOR + slot / SECTOR > 0xffffffff) throw new ImgError('nospace', `vmdk: extent '${this.file.filename}' is full`);
      const at = this.nextAlloc;
      this.nextAlloc += slot;
      await this.file.write!(Buffer.alloc(this.gtBytes), at);
      const e = Buffer.alloc(4);
      e.writeUInt32LE(at / SECTOR, 0);
      if (this.file.flush) await this.file.flush();
      await this.file.write!(e, gdBase + l1i * 4);
      return at;
    };
    if (this.l1b && this.p.rgdOffset) this.l1b[l1i] = (await place(this.p.rgdOffset)) / SECTOR;
    const at = await place(this.p.gdOffset);
    (this.l1 as Uint32Array)[l1i] = at / SECTOR;
    return at;
  }

  /**
   * Writes into grains that are not allocated (or read as zero): whole new grains are
   * appended, the rest of a grain comes from the backing file (or zeros). Serialised by the node.
   */
  async allocWrite(buf: Uint8Array, rel: number): Promise<void> {
    if (this.readOnly) throw new ImgError('readonly', `vmdk: extent '${this.file.filename}' is read-only`);
    if (this.kind === 'se') throw new ImgError('unsupported', 'vmdk: No write support for seSparse images available');
    if (this.compressed) return this.streamWrite(buf, rel);
    const cs = this.clusterSize;
    let done = 0;
    while (done < buf.length) {
      const o = rel + done;
      const g = Math.floor(o / cs);
      const inG = o - g * cs;
      const n = Math.min(buf.length - done, cs - inG);
      const sub = buf.subarray(done, done + n);
      const r = await this.lookup(g);
      if (typeof r === 'number') {
        await this.file.write!(sub, r + inG);
      } else {
        if (this.nextAlloc / SECTOR + this.p.grainSectors > 0xffffffff) throw new ImgError('nospace', `vmdk: extent '${this.file.filename}' is full`);
        const host = this.nextAlloc;
        this.nextAlloc += cs;
        const grain = Buffer.alloc(cs);
        if (n < cs && r === 'unalloc' && this.backingRead) {
          const glen = Math.min(cs, this.size - g * cs);
          await this.backingRead(grain.subarray(0, glen), g * cs);
        }
        grain.set(sub, inG);
        await this.file.write!(grain, host);
        await this.setEntry(g, host / SECTOR);
      }
      done += n;
    }
  }

  /** zeroed-grain GTEs for whole grains; false when not possible */
  async zeroGrains(rel: number, len: number): Promise<boolean> {
    const cs = this.clusterSize;
    if (!this.p.hasZeroGrain || this.compressed || this.kind !== 'vmdk4' || rel % cs || (len % cs && rel + len !== this.size)) return false;
    for (let g = rel / cs; g * cs < rel + len; g++) {
      const l1i = Math.floor(g / this.gtEntries);
      if (!this.gtOffset(l1i)) return false;
    }
    for (let g = rel / cs; g * cs < rel + len; g++) await this.setEntry(g, 1);
    return true;
  }

  // ---- streamOptimized writing ----

  private async initStream(): Promise<void> {
    if (!this.p.hasMarker) return; // qemu refuses compressed writes without markers
    const bytes = this.l1.length * this.gtEntries * 4;
    if (bytes > MAX_STREAM_GT_BYTES) throw new ImgError('unsupported', 'vmdk: streamOptimized image is too large to be opened read-write');
    this.streamGts = new Map();
    let maxHost = -1;
    for (let i = 0; i < this.l1.length; i++) {
      const off = this.gtOffset(i);
      if (!off) continue;
      const gt = Uint32Array.from(await this.loadGt(off) as Uint32Array);
      this.streamGts.set(i, gt);
      for (const e of gt) if (e > 1 && e * SECTOR > maxHost) maxHost = e * SECTOR;
    }
    let end = this.p.header!.grainOffset * SECTOR;
    if (maxHost >= 0) {
      const m = Buffer.alloc(12);
      await this.file.read(m, maxHost);
      end = Math.max(end, Math.ceil((maxHost + 12 + m.readUInt32LE(8)) / SECTOR) * SECTOR);
    }
    this.appendAt = end;
  }

  private async streamWrite(buf: Uint8Array, rel: number): Promise<void> {
    if (!this.streamGts) throw new ImgError('unsupported', `vmdk: '${this.file.filename}' is compressed without grain markers and cannot be written`);
    const cs = this.clusterSize;
    let done = 0;
    while (done < buf.length) {
      const o = rel + done;
      const g = Math.floor(o / cs);
      const inG = o - g * cs;
      const n = Math.min(buf.length - done, cs - inG);
      if (!this.pending || this.pending.idx !== g) {
        const r = await this.lookup(g);
        if (typeof r === 'number') throw new ImgError('unsupported', 'vmdk: Could not write to allocated cluster for streamOptimized');
        await this.flushPending();
        const glen = Math.min(cs, this.size - g * cs);
        const gb = Buffer.alloc(glen);
        if (r === 'unalloc' && this.backingRead) await this.backingRead(gb, g * cs);
        this.pending = { idx: g, buf: gb };
      }
      this.pending.buf.set(buf.subarray(done, done + n), inG);
      done += n;
    }
  }

  async flushPending(): Promise<void> {
    const p = this.pending;
    if (!p) return;
    const z = zlib.deflateSync(p.buf);
    const total = Math.ceil((12 + z.length) / SECTOR) * SECTOR;
    const out = Buffer.alloc(total);
    out.writeBigUInt64LE(BigInt((this.start + p.idx * this.clusterSize) / SECTOR), 0);
    out.writeUInt32LE(z.length, 8);
    z.copy(out, 12);
    const host = this.appendAt;
    await this.file.write!(out, host);
    this.appendAt += total;
    const l1i = Math.floor(p.idx / this.gtEntries);
    let gt = this.streamGts!.get(l1i);
    if (!gt) { gt = new Uint32Array(this.gtEntries); this.streamGts!.set(l1i, gt); }
    gt[p.idx % this.gtEntries] = host / SECTOR;
    this.pending = null;
    this.streamDirty = true;
  }

  /** streamOptimized: grain tables, grain directory, footer and end-of-stream marker */
  override async finish(): Promise<void> {
    if (!this.streamGts) return;
    await this.flushPending();
    if (!this.streamDirty) return;
    const gtSectors = Math.ceil(this.gtEntries * 4 / SECTOR);
    const gd = new Uint32Array(this.l1.length);
    const parts: Buffer[] = [];
    let at = this.appendAt;
    for (let i = 0; i < this.l1.length; i++) {
      const gt = this.streamGts.get(i);
      if (!gt || gt.every((e) => e === 0)) continue;
      parts.push(markerSector(gtSectors, MARKER_GT));
      const b = Buffer.alloc(gtSectors * SECTOR);
      for (let j = 0; j < gt.length; j++) b.writeUInt32LE(gt[j], j * 4);
      parts.push(b);
      gd[i] = at / SECTOR + 1;
      at += SECTOR + b.length;
    }
    const gdSectors = Math.ceil(gd.length * 4 / SECTOR);
    parts.push(markerSector(gdSectors, MARKER_GD));
    const gdBuf = Buffer.alloc(gdSectors * SECTOR);
    for (let i = 0; i < gd.length; i++) gdBuf.writeUInt32LE(gd[i], i * 4);
    parts.push(gdBuf);
    const gdSector = at / SECTOR + 1;
    at += SECTOR + gdBuf.length;
    const h: Vmdk4Header = {
      ...this.p.header!,
      flags: FLAG_NL_DETECT | FLAG_COMPRESS | FLAG_MARKER | (this.p.header!.flags & FLAG_ZERO_GRAIN),
      version: 3,
      rgdOffset: 0,
      compressAlgorithm: COMPRESSION_DEFLATE,
    };
    parts.push(markerSector(1, MARKER_FOOTER));
    parts.push(serializeVmdk4({ ...h, gdOffset: gdSector }));
    parts.push(markerSector(0, MARKER_EOS));
    const all = Buffer.concat(parts);
    await this.file.write!(all, this.appendAt);
    if (this.file.truncate) await this.file.truncate(this.appendAt + all.length);
    await this.file.write!(serializeVmdk4({ ...h, gdOffset: -1 }), 0);
    this.streamDirty = false;
  }
}

/** Opens a sparse extent (KDMV, COWD or seSparse) on `file`; `head` holds its first sector. */
export async function openSparse(file: BlockNode, head: Buffer, type: string, readOnly: boolean, sizeHint: number | null): Promise<SparseExtent> {
  const what = `'${file.filename}'`;
  if (head.length < SECTOR) throw new ImgError('image', `vmdk: ${what} is too small`);
  const magic = head.readUInt32BE(0);
  if (magic === VMDK3_MAGIC) {
    const h = parseCowd(head);
    if (h.granularity === 0 || h.granularity > MAX_GRAIN_SECTORS) throw new ImgError('image', `vmdk: ${what}: Invalid granularity, image may be corrupt`);
    const entryCover = 4096 * h.granularity;
    const need = Math.ceil(h.diskSectors / entryCover);
    if (h.l1dirSize > MAX_L1_ENTRIES) throw new ImgError('image', `vmdk: ${what}: L1 size too big`);
    if (h.l1dirSize < need) throw new ImgError('image', `vmdk: ${what}: grain directory too small for the disk size`);
    const e = new SparseExtent(file, type, readOnly, {
      kind: 'cowd', size: h.diskSectors * SECTOR, grainSectors: h.granularity, gtEntries: 4096, l1Entries: h.l1dirSize,
      gdOffset: h.l1dirOffset * SECTOR, rgdOffset: 0, hasZeroGrain: false, compressed: false, hasMarker: false, version: h.version,
      descOffset: 0, descSize: 0,
    });
    await e.init();
    return e;
  }
  if (magic === VMDK4_MAGIC) {
    let h = parseVmdk4(head);
    if (h.gdOffset === -1) {
      // streamOptimized: the footer (1536 bytes before the end) takes precedence
      if (file.size < 1536 + SECTOR) throw new ImgError('image', `vmdk: ${what}: Invalid footer`);
      const f = Buffer.alloc(1536);
      await file.read(f, Math.floor(file.size / SECTOR) * SECTOR - 1536);
      if (f.readUInt32BE(512) !== VMDK4_MAGIC || f.readUInt32LE(8) !== 0 || f.readUInt32LE(12) !== MARKER_FOOTER
        || f.readBigUInt64LE(1024) !== 0n || f.readUInt32LE(1032) !== 0 || f.readUInt32LE(1036) !== MARKER_EOS) {
        throw new ImgError('image', `vmdk: ${what}: Invalid footer`);
      }
      h = parseVmdk4(f.subarray(512, 1024));
      if (h.gdOffset === -1) throw new ImgError('image', `vmdk: ${what}: footer has no grain directory`);
    }
    const compressed = h.compressAlgorithm === COMPRESSION_DEFLATE;
    if (h.version > 3) throw new ImgError('image', `vmdk: ${what}: Unsupported VMDK version ${h.version}`);
    if (h.version === 3 && !readOnly && !compressed) throw new ImgError('image', `vmdk: ${what}: VMDK version 3 must be read only`);
    if (h.numGtesPerGt > 512) throw new ImgError('image', `vmdk: ${what}: L2 table size too big`);
    if (h.numGtesPerGt === 0 || h.granularity === 0) throw new ImgError('image', `vmdk: ${what}: L1 entry size is invalid`);
    if (h.granularity > MAX_GRAIN_SECTORS) throw new ImgError('image', `vmdk: ${what}: Invalid granularity, image may be corrupt`);
    if (h.capacity > MAX_CAPACITY_SECTORS) throw new ImgError('image', `vmdk: ${what}: capacity too large`);
    const l1Entries = Math.ceil(h.capacity / (h.numGtesPerGt * h.granularity));
    if (l1Entries > MAX_L1_ENTRIES) throw new ImgError('image', `vmdk: ${what}: L1 size too big`);
    if (Math.ceil(file.size / SECTOR) < h.grainOffset) {
      throw new ImgError('image', `vmdk: ${what}: File truncated, expecting at least ${h.grainOffset * SECTOR} bytes`);
    }
    if (h.gdOffset * SECTOR > file.size || ((h.flags & FLAG_RGD) && h.rgdOffset * SECTOR > file.size)) {
      throw new ImgError('image', `vmdk: ${what}: grain directory offset is beyond the end of the file`);
    }
    if (sizeHint !== null && sizeHint > h.capacity * SECTOR) {
      throw new ImgError('image', `vmdk: ${what}: the descriptor's extent size is larger than the extent's capacity`);
    }
    const e = new SparseExtent(file, type, readOnly, {
      kind: 'vmdk4', size: (sizeHint ?? h.capacity * SECTOR), grainSectors: h.granularity, gtEntries: h.numGtesPerGt, l1Entries,
      gdOffset: h.gdOffset * SECTOR, rgdOffset: (h.flags & FLAG_RGD) ? h.rgdOffset * SECTOR : 0,
      hasZeroGrain: !!(h.flags & FLAG_ZERO_GRAIN), compressed, hasMarker: !!(h.flags & FLAG_MARKER), version: h.version, header: h,
      descOffset: h.descOffset * SECTOR, descSize: h.descSize * SECTOR,
    });
    await e.init();
    return e;
  }
  throw new ImgError('image', `vmdk: ${what}: Image not in VMDK format`);
}

export async function openSeSparse(file: BlockNode, head: Buffer, readOnly: boolean): Promise<SparseExtent> {
  const what = `'${file.filename}'`;
  if (!readOnly) throw new ImgError('unsupported', `vmdk: ${what}: No write support for seSparse images available`);
  if (head.length < SECTOR) throw new ImgError('image', `vmdk: ${what} is too small`);
  const h = parseSeSparse(head);
  if (h.volatileHeaderOffset * SECTOR + SECTOR > file.size) throw new ImgError('image', `vmdk: ${what}: seSparse volatile header is beyond the end of the file`);
  const v = Buffer.alloc(SECTOR);
  await file.read(v, h.volatileHeaderOffset * SECTOR);
  checkSeSparseVolatile(v);
  if (h.capacity > MAX_CAPACITY_SECTORS) throw new ImgError('image', `vmdk: ${what}: capacity too large`);
  const l1Entries = h.grainDirSize * SECTOR / 8;
  if (l1Entries > MAX_L1_ENTRIES) throw new ImgError('image', `vmdk: ${what}: L1 size too big`);
  const gtEntries = h.grainTableSize * SECTOR / 8;
  if (l1Entries * gtEntries * h.grainSize < h.capacity) throw new ImgError('image', `vmdk: ${what}: seSparse grain directory too small for the disk size`);
  const e = new SparseExtent(file, 'SESPARSE', true, {
    kind: 'se', size: h.capacity * SECTOR, grainSectors: h.grainSize, gtEntries, l1Entries,
    gdOffset: h.grainDirOffset * SECTOR, rgdOffset: 0, hasZeroGrain: true, compressed: false, hasMarker: false, version: 0,
    seGtOffset: h.grainTablesOffset, seGrainsOffset: h.grainsOffset, descOffset: 0, descSize: 0,
  });
  await e.init();
  return e;
}
