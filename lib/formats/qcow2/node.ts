// The qcow2 block node: L1/L2 mapping, refcounts, allocation, snapshots.
import fs from 'node:fs';
import zlib from 'node:zlib';
import createDebug from 'debug';
import { promisify } from 'node:util';
import { ImgError } from '../../core/errors';
import { loadNative } from '../../core/native';
import { readBacking, readChain } from '../../core/io';
import type { BlockNode, Extent, MapHint, MapInvalidator, SnapshotInfo, WriteFlags, ZeroFlags } from '../../core/node';
import {
  AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2,
  MAX_L1_BYTES, MAX_REFTABLE_BYTES, Qcow2Header, serializeHeader,
} from './header';
import {
  allZero, entryOffset, getRef, maxRef, Mutex, OFLAG_COMPRESSED, OFLAG_COPIED, readEntry, refByteRange, setRef, tableOffsets, TableCache,
  writeEntry,
} from './util';
import { readSnapshotTable, Snapshot, writeSnapshotTableBuf } from './snapshot';
import type { QcowCrypto } from './crypto';

const debug = createDebug('imgmount:qcow2');

const inflateRaw = promisify(zlib.inflateRaw);
/** the most clusters reserved ahead for allocating writes (see allocDataClusters) */
const POOL_MAX_BYTES = 256 << 20;
/** the first window linked ahead of a sequential write (see prelink); it doubles up to the pool */
const PRELINK_FIRST_BYTES = 64 << 20;
/** how far from the end of the last allocating write a write still counts as sequential */
const STREAM_SLACK = 16 << 20;
/** a write at least this long right after allocated data starts a stream (see writeAllocPipelined) */
const STREAM_LARGE_WRITE = 256 << 10;

/** clusters of one L2 table linked ahead of a sequential write (see prelink) */
interface Prelinked {
  l2off: number;
  /** idx: L2 index; hi/lo: the entry before linking */
  entries: { gc: number; idx: number; host: number; hi: number; lo: number }[];
}

interface PendingAlloc {
  items: { gc: number; idx: number }[];
  host0: number;
  l2off: number;
  pos: number;
  done: number;
  dataWritten: Promise<void>;
  linked: boolean;
  release: () => void;
}

export type Kind = 'unalloc' | 'zero' | 'normal' | 'compressed';
export interface L2Info {
  kind: Kind;
  /** host offset of the cluster (normal, zero with preallocation); 0 if none */
  host: number;
  copied: boolean;
  /** a host cluster is assigned (offset 0 is valid in an external data file when COPIED is set) */
  has: boolean;
  /** extended L2: allocation and zero bitmaps */
  alloc: number;
  zero: number;
  hi: number;
  lo: number;
}

export interface NodeParams {
  file: BlockNode;
  header: Qcow2Header;
  readOnly: boolean;
  backing: BlockNode | null;
  dataFile: BlockNode | null;
  filename: string;
  l2CacheBytes: number;
  refCacheBytes: number;
  snapshotL1?: { offset: number; size: number; diskSize: number } | null;
  /** encrypted images: every data cluster passes through this (never a host mapping) */
  crypto?: QcowCrypto | null;
}

const ALL32 = 0xffffffff;

export class Qcow2Node implements BlockNode {
  readonly driver = 'qcow2';
  readonly readOnly: boolean;
  readonly align: number;
  readonly file: BlockNode;
  backing: BlockNode | null;
  readonly dataFile: BlockNode | null;
  mapInvalidator: MapInvalidator | null = null;
  mapHint: MapHint | null = null;
  hdr: Qcow2Header;
  readonly cs: number;
  readonly cb: number;
  readonly extL2: boolean;
  readonly es: number;
  readonly l2Entries: number;
  readonly scSize: number;
  l1: Buffer;
  refTable: Buffer;
  refTableEntries: number;
  readonly rbShift: number;
  readonly refOrder: number;
  private l2Cache: TableCache;
  private refCache: TableCache;
  readonly lock = new Mutex();
  private freeHint = 0;
  private fastWrites = new Set<Promise<unknown>>();
  /** while set, in-place writes wait before they look at the L2 tables (settlePrelinked) */
  private gate: Promise<void> | null = null;
  private dirtySet = false;
  private closed = false;
  private lastCompressed: { key: string; data: Buffer } | null = null;
  snapshotsList: Snapshot[] = [];
  private _size: number;
  private readonly isSnapshotView: boolean;
  readonly filenameStr: string;
  readonly crypto: QcowCrypto | null;

  constructor(p: NodeParams) {
    this.crypto = p.crypto ?? null;
    this.file = p.file;
    this.hdr = p.header;
    this.readOnly = p.readOnly;
    this.backing = p.backing;
    this.dataFile = p.dataFile;
    this.filenameStr = p.filename;
    this.align = this.crypto ? Math.max(512, p.file.align) : p.file.align;
    this.cb = p.header.clusterBits;
    this.cs = 2 ** this.cb;
    this.extL2 = !!(p.header.incompatible & INCOMPAT_EXTL2);
    this.es = this.extL2 ? 16 : 8;
    this.l2Entries = this.cs / this.es;
    this.scSize = this.extL2 ? this.cs / 32 : this.cs;
    this.refOrder = p.header.refcountOrder;
    this.rbShift = this.cb + 3 - this.refOrder;
    this.l1 = Buffer.alloc(0);
    this.refTable = Buffer.alloc(0);
    this.refTableEntries = 0;
    this.l2Cache = new TableCache(p.l2CacheBytes);
    this.refCache = new TableCache(p.refCacheBytes);
    this._size = p.snapshotL1 ? p.snapshotL1.diskSize : p.header.size;
    this.isSnapshotView = !!p.snapshotL1;
  }

  get size(): number { return this._size; }
  get filename(): string { return this.filenameStr; }
  get dataNode(): BlockNode { return this.dataFile ?? this.file; }
  get dataFileRaw(): boolean { return !!this.dataFile && !!(this.hdr.autoclear & AUTOCLEAR_DATA_FILE_RAW); }

  /** loads L1 and refcount table; called once by the driver */
  async init(snapshotL1?: { offset: number; size: number } | null): Promise<void> {
    const l1off = snapshotL1 ? snapshotL1.offset : this.hdr.l1TableOffset;
    const l1size = snapshotL1 ? snapshotL1.size : this.hdr.l1Size;
    this.l1 = Buffer.alloc(l1size * 8);
    if (l1size) await this.file.read(this.l1, l1off);
    const rtBytes = this.hdr.refcountTableClusters * this.cs;
    this.refTable = Buffer.alloc(rtBytes);
    await this.file.read(this.refTable, this.hdr.refcountTableOffset);
    this.refTableEntries = rtBytes / 8;
    if (!snapshotL1) this.snapshotsList = await readSnapshotTable(this.file, this.hdr);
  }

  // ---------------------------------------------------------------- lookup

  l1Entry(i: number): { off: number; copied: boolean } {
    if (i * 8 >= this.l1.length) return { off: 0, copied: false };
    const [hi, lo] = readEntry(this.l1, i * 8);
    const off = entryOffset(hi, lo);
    if (off % this.cs) throw this.corrupt(`L2 table offset 0x${off.toString(16)} unaligned (L1 index ${i})`);
    return { off, copied: (hi & OFLAG_COPIED) !== 0 };
  }

  corrupt(msg: string): ImgError {
    return new ImgError('image', `qcow2: image is corrupt: ${msg}`);
  }

  // Metadata overlap check (qemu's overlap-check=cached): a data write that would land on
  // the header, L1, refcount table, refcount blocks, active L2 tables or the snapshot table
  // marks the image corrupt and fails; reads go on. The cluster set is rebuilt after any
  // metadata change (every allocation or free goes through updateRefcount).
  private metaClusters: Set<number> | null = null;
  private metaKey: unknown[] = [];

  private metaSet(): Set<number> {
    // rebuilt when a table moves or is replaced; setL1 and refcount-table writes reset it
    const key = [this.hdr.l1TableOffset, this.hdr.l1Size, this.hdr.refcountTableOffset, this.hdr.refcountTableClusters,
      this.hdr.snapshotsOffset, this.hdr.nbSnapshots, this.l1, this.refTable];
    if (this.metaClusters && key.every((v, i) => v === this.metaKey[i])) return this.metaClusters;
    this.metaKey = key;
    const cs = this.cs;
    const set = new Set<number>([0]);
    const addRange = (off: number, len: number): void => {
      for (let c = Math.floor(off / cs); c * cs < off + len; c++) set.add(c);
    };
    addRange(this.hdr.l1TableOffset, Math.max(1, this.hdr.l1Size * 8));
    addRange(this.hdr.refcountTableOffset, this.hdr.refcountTableClusters * cs);
    if (this.hdr.nbSnapshots && this.hdr.snapshotsOffset) addRange(this.hdr.snapshotsOffset, Math.max(1, writeSnapshotTableBuf(this.snapshotsList).length));
    // (a 64 KiB refcount table is mostly empty: an entry-by-entry loop took 8 ms on the
    // first allocating write, which waits for it)
    for (const off of tableOffsets(this.refTable, this.refTableEntries)) set.add(Math.floor(off / cs));
    for (const off of tableOffsets(this.l1, this.l1.length / 8)) set.add(Math.floor(off / cs));
    this.metaClusters = set;
    return set;
  }

  overlapsMetadata(host: number, len: number): boolean {
    if (this.dataFile || len <= 0) return false;
    const set = this.metaSet();
    for (let c = Math.floor(host / this.cs); c * this.cs < host + len; c++) if (set.has(c)) return true;
    return false;
  }

  private async checkOverlap(host: number, len: number, guest: number): Promise<void> {
    if (!this.overlapsMetadata(host, len)) return;
    this.hdr.incompatible |= INCOMPAT_CORRUPT;
    try {
      await this.writeFeatureBits();
      await this.file.flush?.();
    } catch { /* the write below fails anyway */ }
    throw new ImgError('io', `qcow2: data write at guest offset ${guest} would overwrite metadata at host offset 0x${host.toString(16)}; image marked corrupt`);
  }

  async loadL2(off: number): Promise<Buffer> {
    const dirty = this.dirtyL2.get(off);
    if (dirty) return dirty;
    return this.l2Cache.load(off, this.cs, (b, o) => this.file.read(b, o));
  }

  decode(l2: Buffer, idx: number): L2Info {
    const at = idx * this.es;
    const hi = l2.readUInt32BE(at);
    const lo = l2.readUInt32BE(at + 4);
    const copied = (hi & OFLAG_COPIED) !== 0;
    if (hi & OFLAG_COMPRESSED) return { kind: 'compressed', host: 0, copied: false, has: false, alloc: 0, zero: 0, hi, lo };
    const host = entryOffset(hi, lo);
    const has = host !== 0 || (!!this.dataFile && copied);
    if (this.extL2) {
      const zero = l2.readUInt32BE(at + 8);
      const alloc = l2.readUInt32BE(at + 12);
      if (host && host % this.cs) throw this.corrupt(`cluster allocation offset 0x${host.toString(16)} unaligned`);
      return { kind: has ? 'normal' : (zero ? 'zero' : 'unalloc'), host, copied, has, alloc, zero, hi, lo };
    }
    if (lo & 1) return { kind: 'zero', host, copied, has, alloc: 0, zero: 0, hi, lo };
    if (!has) return { kind: 'unalloc', host: 0, copied, has, alloc: 0, zero: 0, hi, lo };
    if (host % this.cs) throw this.corrupt(`cluster allocation offset 0x${host.toString(16)} unaligned`);
    return { kind: 'normal', host, copied, has, alloc: 0, zero: 0, hi, lo };
  }

  /** L2 info for guest cluster gc (null L2 = unallocated table) */
  async info(gc: number): Promise<L2Info> {
    const l1i = Math.floor(gc / this.l2Entries);
    const { off } = this.l1Entry(l1i);
    if (!off) return { kind: 'unalloc', host: 0, copied: false, has: false, alloc: 0, zero: 0, hi: 0, lo: 0 };
    const l2 = await this.loadL2(off);
    return this.decode(l2, gc % this.l2Entries);
  }

  /** status of the (sub)cluster run at pos: state, host offset at pos, bytes to the end of the (sub)cluster */
  private async statusAt(pos: number): Promise<{ state: 'data' | 'zero' | 'unallocated'; host: number; compressed: boolean; writable: boolean; len: number; skip?: number }> {
    const gc = Math.floor(pos / this.cs);
    const l1i = Math.floor(gc / this.l2Entries);
    const { off } = this.l1Entry(l1i);
    if (!off) {
      const end = (l1i + 1) * this.l2Entries * this.cs;
      return { state: 'unallocated', host: 0, compressed: false, writable: false, len: end - pos };
    }
    const l2 = await this.loadL2(off);
    const inf = this.decode(l2, gc % this.l2Entries);
    const inCluster = pos - gc * this.cs;
    const toClusterEnd = this.cs - inCluster;
    const rw = !this.readOnly && !this.isSnapshotView;
    switch (inf.kind) {
      case 'compressed':
        return { state: 'data', host: 0, compressed: true, writable: false, len: toClusterEnd };
      case 'unalloc':
        if (this.extL2 && inf.alloc) throw this.corrupt('subcluster allocated without a host cluster');
        if (this.extL2 && inf.zero) return this.subStatus(inf, pos, inCluster, rw);
        return { state: 'unallocated', host: 0, compressed: false, writable: false, len: toClusterEnd };
      case 'zero':
        if (this.extL2) return this.subStatus(inf, pos, inCluster, rw);
        return { state: 'zero', host: 0, compressed: false, writable: false, len: toClusterEnd };
      default:
        if (this.extL2) return this.subStatus(inf, pos, inCluster, rw);
        return { state: 'data', host: inf.host + inCluster, compressed: false, writable: rw && inf.copied && !this.overlapsMetadata(inf.host, this.cs), len: toClusterEnd };
    }
  }

  private subStatus(inf: L2Info, pos: number, inCluster: number, rw: boolean) {
    const sc = Math.floor(inCluster / this.scSize);
    const bit = 1 << sc;
    // run of subclusters with the same state
    const state = (inf.zero & bit) ? 'zero' : (inf.alloc & bit) ? 'data' : 'unallocated';
    if ((inf.zero & bit) && (inf.alloc & bit)) throw this.corrupt('subcluster both allocated and zero');
    let n = sc + 1;
    while (n < 32) {
      const b = 1 << n;
      const s = (inf.zero & b) ? 'zero' : (inf.alloc & b) ? 'data' : 'unallocated';
      if (s !== state) break;
      n++;
    }
    const len = n * this.scSize - inCluster;
    const host = state === 'data' ? inf.host + inCluster : 0;
    if (state === 'data' && !inf.has) throw this.corrupt('subcluster allocated without a host cluster');
    return { state: state as 'data' | 'zero' | 'unallocated', host, compressed: false, writable: rw && inf.copied && state === 'data' && !this.overlapsMetadata(inf.host, this.cs), len };
  }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    const end = Math.min(offset + length, this._size);
    let pos = offset;
    const first = await this.statusAt(pos);
    let n = Math.min(first.len, end - pos);
    pos += n;
    let hostNext = first.host + n;
    for (let steps = 0; pos < end && steps < 65536; steps++) {
      const s = await this.statusAt(pos);
      if (s.state !== first.state || s.compressed !== first.compressed || s.writable !== first.writable) break;
      if (first.state === 'data' && !first.compressed && s.host !== hostNext) break;
      n = Math.min(s.len, end - pos);
      pos += n;
      hostNext = s.host + n;
    }
    const ext: Extent = { offset, length: Math.max(1, pos - offset), state: first.state };
    const hostCrypt = this.crypto?.hostCrypt;
    if (first.state === 'data' && !first.compressed && (!this.crypto || hostCrypt)) {
      const dn = this.dataNode as unknown as { fd?: unknown; direct?: unknown };
      if (typeof dn.fd === 'number') {
        ext.host = { fd: dn.fd, offset: first.host, writable: first.writable, direct: !!dn.direct };
        if (hostCrypt) ext.host.crypt = hostCrypt;
      }
    }
    return ext;
  }

  // ---------------------------------------------------------------- read

  async read(buf: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const s = await this.statusAt(pos);
      const n = Math.min(s.len, buf.length - done);
      const sub = buf.subarray(done, done + n);
      if (s.state === 'zero') sub.fill(0);
      else if (s.state === 'unallocated') await readBacking(this.backing, sub, pos);
      else if (s.compressed) {
        const data = await this.readCompressed(Math.floor(pos / this.cs));
        const inC = pos % this.cs;
        sub.set(data.subarray(inC, inC + n));
      } else {
        await this.dataNode.read(sub, s.host);
        this.crypto?.decrypt(sub, s.host, pos);
      }
      done += n;
    }
  }

  compressedRange(inf: L2Info): { off: number; size: number; nbBytes: number } {
    const e = (BigInt(inf.hi) << 32n) | BigInt(inf.lo);
    const x = BigInt(62 - (this.cb - 8));
    const off = Number(e & ((1n << x) - 1n));
    const nsec = Number((e >> x) & ((1n << BigInt(this.cb - 8)) - 1n)) + 1;
    return { off, size: nsec * 512 - (off & 511), nbBytes: nsec * 512 };
  }

  async readCompressed(gc: number): Promise<Buffer> {
    const inf = await this.info(gc);
    const { off, size } = this.compressedRange(inf);
    const key = `${inf.hi}:${inf.lo}`;
    if (this.lastCompressed?.key === key) return this.lastCompressed.data;
    if (this.dataFile) throw this.corrupt('compressed cluster in an image with an external data file');
    const src = Buffer.alloc(size);
    await this.file.read(src, off);
    let out: Buffer;
    try {
      if (this.hdr.compressionType === 1) out = await zstdDecompress(src, this.cs);
      else out = await inflateRaw(src, { finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: this.cs, chunkSize: Math.max(64, this.cs) }) as Buffer;
    } catch (e) {
      if (e instanceof ImgError) throw e;
      throw new ImgError('image', `qcow2: could not decompress cluster at guest offset ${gc * this.cs}: ${(e as Error).message}`);
    }
    if (out.length < this.cs) {
      throw new ImgError('image', `qcow2: compressed cluster at guest offset ${gc * this.cs} decompresses to ${out.length} bytes, expected ${this.cs}`);
    }
    this.lastCompressed = { key, data: out };
    return out;
  }

  // ---------------------------------------------------------------- refcounts

  refTableEntry(bi: number): number {
    if (bi >= this.refTableEntries) return 0;
    const [hi, lo] = readEntry(this.refTable, bi * 8);
    const off = entryOffset(hi, lo);
    if (off % this.cs) throw this.corrupt(`refblock offset 0x${off.toString(16)} unaligned (reftable index ${bi})`);
    return off;
  }

  async loadRefBlock(off: number): Promise<Buffer> {
    // a block evicted while its write-behind is in flight must not be read back stale
    return this.refCache.load(off, this.cs, async (b, o) => {
      await this.refWritesDone();
      await this.file.read(b, o);
    });
  }

  async refcount(cluster: number): Promise<number> {
    const bi = Math.floor(cluster / 2 ** this.rbShift);
    const off = this.refTableEntry(bi);
    if (!off) return 0;
    const blk = await this.loadRefBlock(off);
    return getRef(blk, cluster % 2 ** this.rbShift, this.refOrder);
  }

  /** finds n contiguous clusters with refcount 0 (does not set them) */
  private async allocNoRef(n: number): Promise<number> {
    const per = 2 ** this.rbShift;
    let start = this.freeHint;
    let run = 0;
    let c = start;
    while (run < n) {
      const bi = Math.floor(c / per);
      const off = this.refTableEntry(bi);
      if (!off) {
        // a whole block's range with no block: all free
        const blockEnd = (bi + 1) * per;
        const take = Math.min(blockEnd - c, n - run);
        run += take; c += take;
        continue;
      }
      const blk = await this.loadRefBlock(off);
      const blockEnd = (bi + 1) * per;
      // whole refcount bytes: the run's rest, if free, is found at once
      const take = Math.min(blockEnd - c, n - run);
      if (this.refOrder >= 3 && allZero(blk, ((c - bi * per) << this.refOrder) >> 3, ((c + take - bi * per) << this.refOrder) >> 3)) {
        run += take; c += take;
        continue;
      }
      while (c < blockEnd && run < n) {
        if (getRef(blk, c - bi * per, this.refOrder) === 0) { run++; c++; } else { c++; start = c; run = 0; }
      }
    }
    this.freeHint = start + n;
    return start;
  }

  // Clusters reserved for allocating data writes: counted (refcount 1) on disk ahead of use, so
  // a stream of allocations costs one refcount write per reservation, not one per request
  // (qemu gets the same from its writeback refcount cache). A crash leaks at most the unused
  // reservation; flush and every metadata operation (drainFastWrites) give it back.
  private pool = { next: 0, end: 0, grow: 0, fresh: false };

  /** n contiguous clusters for data, from the reservation; returns the byte offset */
  private async allocDataClusters(n: number): Promise<number> {
    if (this.pool.end - this.pool.next < n) await this.refillPool(n);
    const c = this.pool.next;
    this.pool.next += n;
    return c * this.cs;
  }

  /** a new reservation of at least n clusters (the rest of the old one is given back) */
  private async refillPool(n: number): Promise<void> {
    const grow = this.pool.grow;
    await this.releasePool();
    const max = Math.max(1, Math.floor(POOL_MAX_BYTES / this.cs));
    const want = Math.max(n, 1, Math.min(max, grow));
    const c = await this.allocNoRef(want);
    // not waited for here: nothing on disk points at these clusters before the L2 tables are
    // written, and writeDirtyL2 waits for this write first (qemu's refcount-before-L2 order)
    await this.updateRefcount(c * this.cs, want * this.cs, 1, true);
    // clusters in a hole of the file (or past its end) read as zeros until written (see prelink)
    const fresh = this.dataRanges(c * this.cs, (c + want) * this.cs)?.length === 0;
    this.pool = { next: c, end: c + want, grow: Math.min(max, Math.max(2 * want, 2 * n)), fresh };
  }

  /** gives the unused reserved clusters back (their refcounts drop to 0) */
  private async releasePool(): Promise<void> {
    const { next, end } = this.pool;
    this.pool = { next: 0, end: 0, grow: 0, fresh: false };
    if (end > next) await this.updateRefcount(next * this.cs, (end - next) * this.cs, -1);
  }

  /** the data ranges of [off, end) of the host file, in order (null when that is unknown) */
  private dataRanges(off: number, end: number): [number, number][] | null {
    const fd = (this.dataNode as unknown as { fd?: unknown }).fd;
    const nat = loadNative();
    if (typeof fd !== 'number' || !nat) return null;
    const out: [number, number][] = [];
    // past the end of the file: no lseek, which on tmpfs waits for the inode lock behind writers
    end = Math.min(end, fs.fstatSync(fd).size);
    for (let pos = off; pos < end;) {
      const d = nat.lseek(fd, pos, 3 /* SEEK_DATA */);
      if (d === -6 /* ENXIO: only holes from pos on */ || d >= end) break;
      if (d < 0) return null;
      const h = nat.lseek(fd, d, 4 /* SEEK_HOLE */);
      if (h <= d) return null; // an error (or a file changing under us): unknown
      out.push([d, Math.min(h, end)]);
      pos = h;
    }
    return out;
  }

  // Sequential allocating writes (a guest filling an empty disk) would each pass through
  // here. Instead, a write that continues allocated data links a window of the following
  // clusters at once, to fresh clusters past the end of the file that read as zeros, and
  // the export maps them, so the next writes go straight to the host file natively. Only
  // in memory: the L2 tables reach the disk at flush, after settlePrelinked() has put back
  // every linked cluster that was not written (a hole in the host file), so on disk an L2
  // entry never points at unwritten data, and the image still grows only as written.
  // Unallocated clusters read as zeros only without a backing file and without encryption.
  private prelinked: Prelinked[] = [];
  private prelinkGrow = 0;
  /** where the last allocating write or linked-ahead window ended */
  private streamEnd = -Infinity;

  private async prelink(t: { buf: Buffer; off: number }, l1i: number, gcStart: number): Promise<{ offset: number; length: number } | null> {
    if (this.backing || this.crypto || this.dataFile || this.extL2 || !this.mapHint) return null;
    const cs = this.cs;
    const max = Math.max(1, Math.floor(POOL_MAX_BYTES / cs));
    const nClusters = Math.ceil(this._size / cs);
    const want = Math.min(max, this.prelinkGrow);
    const entries: Prelinked['entries'] = [];
    // the window starts after the requests already in flight just ahead of this one
    let gc = gcStart;
    for (let skip = 0; skip < 256 && gc < nClusters && Math.floor(gc / this.l2Entries) === l1i; skip++, gc++) {
      if (!this.allocInflight.has(gc) && this.decode(t.buf, gc % this.l2Entries).kind !== 'normal') break;
    }
    // and past the requests of the queue that arrived ahead of their turn (a gap they leave
    // is allocated by its own request when it comes), or the window would end at the first
    for (const k of this.allocInflight.keys()) {
      if (k >= gc && (k - gc) * cs <= STREAM_SLACK && Math.floor(k / this.l2Entries) === l1i) gc = k + 1;
    }
    // a run of zero entries (a new L2 table) is taken at once, up to the first allocation in flight
    let zeros = Math.min(want, nClusters - gc, this.l2Entries - (gc % this.l2Entries));
    for (const k of this.allocInflight.keys()) if (k >= gc && k - gc < zeros) zeros = k - gc;
    if (zeros > 0 && allZero(t.buf, (gc % this.l2Entries) * this.es, (gc % this.l2Entries + zeros) * this.es)) {
      for (const end = gc + zeros; gc < end; gc++) entries.push({ gc, idx: gc % this.l2Entries, host: 0, hi: 0, lo: 0 });
    }
    for (; entries.length < want && gc < nClusters && Math.floor(gc / this.l2Entries) === l1i; gc++) {
      if (this.allocInflight.has(gc)) break;
      const idx = gc % this.l2Entries;
      const inf = this.decode(t.buf, idx);
      if (!(inf.kind === 'unalloc' || (inf.kind === 'zero' && !inf.has))) break;
      entries.push({ gc, idx, host: 0, hi: inf.hi, lo: inf.lo });
    }
    if (!entries.length) return null;
    if (this.pool.end > this.pool.next && !this.pool.fresh) return null;
    // a reservation much too small for the window (as at the start of a stream) is replaced:
    // its rest is given back first, so the new one starts at the same place unless metadata
    // was allocated right after it; a big rest is used up first, so that it leaves no hole
    const left = this.pool.end - this.pool.next;
    if (left < entries.length / 4) await this.refillPool(entries.length);
    entries.length = Math.min(entries.length, this.pool.end - this.pool.next);
    if (!this.pool.fresh || !entries.length) return null;
    this.mapInvalidator?.(entries[0].gc * cs, Math.min(entries.length * cs, this._size - entries[0].gc * cs));
    const host0 = await this.allocDataClusters(entries.length);
    entries.forEach((e, i) => {
      e.host = host0 + i * cs;
      this.setL2(t.buf, e.idx, e.host, true, false);
    });
    this.dirtyL2.set(t.off, t.buf);
    this.prelinked.push({ l2off: t.off, entries });
    this.prelinkGrow = Math.min(max, this.prelinkGrow * 2);
    const offset = entries[0].gc * cs;
    const length = Math.min(entries.length * cs, this._size - offset);
    // mapped right here, under the metadata lock, so no later unlink can overtake it
    const dn = this.dataNode as unknown as { fd?: unknown; direct?: unknown };
    if (typeof dn.fd === 'number') this.mapHint?.(offset, length, { fd: dn.fd, offset: host0, writable: true, direct: !!dn.direct, notify: true });
    return { offset, length };
  }

  private extending = false;

  // The export reports the first write into a linked-ahead window. When the stream enters
  // the newest window, the next one is linked at once, while the native threads write this
  // one: otherwise every window would end in writes that miss the map and wait here.
  onMappedWrite(offset: number): void {
    const last = this.prelinked[this.prelinked.length - 1];
    if (!last || this.extending || !this.prelinkGrow) return;
    const cs = this.cs;
    if (offset < last.entries[0].gc * cs || offset >= (last.entries[last.entries.length - 1].gc + 1) * cs) return;
    this.extending = true;
    this.lock.run(async () => {
      // settled (a flush, a broken stream) or extended meanwhile: nothing to do
      if (this.prelinked[this.prelinked.length - 1] !== last || !this.prelinkGrow) return;
      await this.markDirty();
      // a window cut short by the end of an L2 table leaves little time: link one more then
      for (let n = 0; n < 3; n++) {
        const tail = this.prelinked[this.prelinked.length - 1];
        const gcStart = tail.entries[tail.entries.length - 1].gc + 1;
        if (gcStart * cs >= this._size) return;
        const l1i = Math.floor(gcStart / this.l2Entries);
        const ahead = await this.prelink(await this.l2ForWrite(l1i), l1i, gcStart);
        if (!ahead) return;
        this.streamEnd = Math.max(this.streamEnd, ahead.offset + ahead.length);
        if (ahead.length >= PRELINK_FIRST_BYTES) return;
      }
    }).catch((e) => debug('linking ahead: %s', (e as Error).message)).finally(() => { this.extending = false; });
  }

  /** under the metadata lock: unlinks the linked-ahead clusters that were never written */
  private async settlePrelinked(): Promise<void> {
    if (!this.prelinked.length) return;
    let open!: () => void;
    this.gate = new Promise<void>((r) => { open = r; });
    try {
      // in-place writes that already saw a linked cluster must land before it is judged
      while (this.fastWrites.size) await Promise.allSettled([...this.fastWrites]);
      await this.unlinkUnwritten();
    } finally {
      this.gate = null;
      open();
    }
  }

  private async unlinkUnwritten(): Promise<void> {
    const chunks = this.prelinked;
    this.prelinked = [];
    const cs = this.cs;
    for (const ch of chunks) {
      const first = ch.entries[0].gc * cs;
      // no native write may be in flight while we look at what reached the file
      this.mapInvalidator?.(first, Math.min(ch.entries.length * cs, this._size - first));
      const l2 = await this.loadL2(ch.l2off);
      let freed = false;
      let run = { host: 0, len: 0 };
      // the window is contiguous on the host: what reached the file, in a few lseeks
      const h0 = ch.entries[0].host;
      const data = this.dataRanges(h0, h0 + ch.entries.length * cs);
      let di = 0;
      for (const e of ch.entries) {
        while (data && di < data.length && data[di][1] <= e.host) di++;
        // written (or unknown: keeping it is safe)
        if (!data || (di < data.length && data[di][0] < e.host + cs)) continue;
        l2.writeUInt32BE(e.hi >>> 0, e.idx * this.es);
        l2.writeUInt32BE(e.lo >>> 0, e.idx * this.es + 4);
        freed = true;
        if (run.host + run.len === e.host) { run.len += cs; continue; }
        if (run.len) await this.updateRefcount(run.host, run.len, -1);
        run = { host: e.host, len: cs };
      }
      if (run.len) await this.updateRefcount(run.host, run.len, -1);
      if (freed) this.dirtyL2.set(ch.l2off, l2);
    }
  }

  /** allocates n contiguous clusters with refcount 1; returns the byte offset */
  async allocClusters(n: number): Promise<number> {
    const c = await this.allocNoRef(n);
    await this.updateRefcount(c * this.cs, n * this.cs, 1);
    return c * this.cs;
  }

  private async writeRefTableEntry(bi: number, off: number): Promise<void> {
    this.metaClusters = null;
    writeEntry(this.refTable, bi * 8, off, 0);
    await this.file.write!(this.refTable.subarray(bi * 8, bi * 8 + 8), this.hdr.refcountTableOffset + bi * 8);
  }

  private async refBlockFor(cluster: number): Promise<Buffer> {
    const per = 2 ** this.rbShift;
    const bi = Math.floor(cluster / per);
    if (bi >= this.refTableEntries) await this.growRefTable(bi);
    let off = this.refTableEntry(bi);
    if (off) return this.loadRefBlock(off);
    const nb = await this.allocNoRef(1);
    const buf = Buffer.alloc(this.cs);
    const self = Math.floor(nb / per) === bi;
    if (self) setRef(buf, nb % per, this.refOrder, 1);
    off = nb * this.cs;
    await this.file.write!(buf, off);
    this.refCache.set(off, buf);
    await this.writeRefTableEntry(bi, off);
    if (!self) await this.updateRefcount(off, this.cs, 1);
    return this.loadRefBlock(off);
  }

  /** refcount writes still in flight (see refillPool); L2 tables are written only after them */
  private refWrites = new Set<Promise<void>>();
  /** a write-behind that failed: from then on no L2 table is written (the refcounts on disk
   *  may lack clusters that the tables would point at), so the image stays consistent */
  private refWriteError: Error | null = null;

  private async refWritesDone(): Promise<void> {
    while (this.refWrites.size) await Promise.allSettled([...this.refWrites]);
    if (this.refWriteError) throw this.refWriteError;
  }

  /** adds `addend` to the refcount of every cluster in [offset, offset+length); with
   *  `behind`, the changed bytes are written without waiting (refWritesDone waits) */
  async updateRefcount(offset: number, length: number, addend: number, behind = false): Promise<void> {
    if (length <= 0) return;
    const per = 2 ** this.rbShift;
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + length - 1) / this.cs);
    const max = maxRef(this.refOrder);
    let c = first;
    while (c <= last) {
      const blk = await this.refBlockFor(c);
      const bi = Math.floor(c / per);
      const off = this.refTableEntry(bi);
      const blockEnd = Math.min((bi + 1) * per - 1, last);
      // the bytes this block's changes span
      const lo = refByteRange(c - bi * per, this.refOrder)[0];
      const hi = refByteRange(blockEnd - bi * per, this.refOrder)[1];
      for (; c <= blockEnd; c++) {
        const i = c - bi * per;
        const v = getRef(blk, i, this.refOrder) + addend;
        if (v < 0) throw this.corrupt(`refcount of cluster ${c} would drop below zero`);
        if (v > max) throw new ImgError('image', `qcow2: refcount of cluster ${c} would exceed the maximum of ${max}`);
        setRef(blk, i, this.refOrder, v);
        if (v === 0 && c < this.freeHint) this.freeHint = c;
      }
      if (hi > lo) {
        // a view of the live block: whichever write runs last stores the newest bytes
        const w = this.file.write!(blk.subarray(lo, hi), off + lo);
        if (behind) {
          const p: Promise<void> = w.catch((e: Error) => { this.refWriteError ??= e; }).finally(() => { this.refWrites.delete(p); });
          this.refWrites.add(p);
        } else {
          await w;
        }
      }
    }
  }

  /** sets a refcount absolutely (check repair) */
  async setRefcount(cluster: number, v: number): Promise<void> {
    const cur = await this.refcount(cluster);
    if (cur !== v) await this.updateRefcount(cluster * this.cs, this.cs, v - cur);
  }

  /** a bigger refcount table with blocks for itself, placed after the end of the file */
  private async growRefTable(neededBi: number): Promise<void> {
    this.metaClusters = null;
    const per = 2 ** this.rbShift;
    const cs = this.cs;
    const oldEntries = this.refTableEntries;
    let newEntries = Math.max(neededBi + 1, Math.ceil((oldEntries * 3) / 2));
    const areaStart = Math.max(Math.ceil(this.file.size / cs), this.freeHint);
    let missing: number[] = [];
    let tableClusters = 0;
    for (let iter = 0; iter < 100; iter++) {
      tableClusters = Math.ceil((newEntries * 8) / cs);
      let nb = 0;
      for (let k = 0; k < 100; k++) {
        const areaEnd = areaStart + nb + tableClusters;
        missing = [];
        for (let bi = Math.floor(areaStart / per); bi <= Math.floor((areaEnd - 1) / per); bi++) {
          if (bi >= oldEntries || this.refTableEntry(bi) === 0) missing.push(bi);
        }
        if (missing.length === nb) break;
        nb = missing.length;
      }
      const maxBi = missing.length ? missing[missing.length - 1] : 0;
      if (maxBi < newEntries) break;
      newEntries = maxBi + 1;
    }
    if (newEntries * 8 > MAX_REFTABLE_BYTES) throw new ImgError('nospace', 'qcow2: the refcount table would exceed its maximum size');
    const nb = missing.length;
    const tableOff = (areaStart + nb) * cs;
    const areaEnd = areaStart + nb + tableClusters;
    const newTable = Buffer.alloc(tableClusters * cs);
    this.refTable.copy(newTable, 0, 0, Math.min(this.refTable.length, newTable.length));
    for (let k = 0; k < nb; k++) {
      const bi = missing[k];
      const blockOff = (areaStart + k) * cs;
      const blk = Buffer.alloc(cs);
      for (let c = Math.max(areaStart, bi * per); c < Math.min(areaEnd, (bi + 1) * per); c++) setRef(blk, c - bi * per, this.refOrder, 1);
      await this.file.write!(blk, blockOff);
      this.refCache.set(blockOff, blk);
      writeEntry(newTable, bi * 8, blockOff, 0);
    }
    await this.file.write!(newTable, tableOff);
    await this.file.flush?.();
    const oldOff = this.hdr.refcountTableOffset;
    const oldClusters = this.hdr.refcountTableClusters;
    const hb = Buffer.alloc(12);
    hb.writeBigUInt64BE(BigInt(tableOff), 0);
    hb.writeUInt32BE(tableClusters, 8);
    await this.file.write!(hb, 48);
    this.hdr.refcountTableOffset = tableOff;
    this.hdr.refcountTableClusters = tableClusters;
    this.refTable = newTable;
    this.refTableEntries = newTable.length / 8;
    // area clusters covered by blocks that already existed
    for (let c = areaStart; c < areaEnd; c++) {
      const bi = Math.floor(c / per);
      if (!missing.includes(bi)) await this.updateRefcount(c * cs, cs, 1);
    }
    if (this.freeHint < areaEnd && this.freeHint >= areaStart) this.freeHint = areaEnd;
    await this.updateRefcount(oldOff, oldClusters * cs, -1);
  }

  /** frees whatever an L2 entry points to (one reference) */
  async freeEntry(inf: L2Info): Promise<void> {
    if (inf.kind === 'compressed') {
      const r = this.compressedRange(inf);
      const start = r.off - (r.off & 511);
      await this.updateRefcount(start, r.nbBytes, -1);
    } else if (inf.has && !this.dataFile) {
      await this.updateRefcount(inf.host, this.cs, -1);
    }
  }

  // ---------------------------------------------------------------- write

  private checkRw(): void {
    if (this.readOnly || this.isSnapshotView) throw new ImgError('readonly', 'qcow2: the image is opened read-only');
    if (this.hdr.incompatible & INCOMPAT_CORRUPT) throw new ImgError('image', 'qcow2: the image is marked corrupt');
  }

  private async markDirty(): Promise<void> {
    if (this.dirtySet || !(this.hdr.compatible & COMPAT_LAZY_REFCOUNTS) || this.hdr.version < 3) return;
    this.hdr.incompatible |= INCOMPAT_DIRTY;
    await this.writeFeatureBits();
    await this.file.flush?.();
    this.dirtySet = true;
  }

  async writeFeatureBits(): Promise<void> {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(this.hdr.incompatible, 0);
    await this.file.write!(b, 72);
  }

  private inPlace(inf: L2Info, start: number, n: number): boolean {
    if (inf.kind !== 'normal' || !inf.copied) return false;
    if (!this.extL2) return true;
    const inC = start % this.cs;
    const s0 = Math.floor(inC / this.scSize);
    const s1 = Math.floor((inC + n - 1) / this.scSize);
    for (let s = s0; s <= s1; s++) if (!(inf.alloc & (1 << s)) || (inf.zero & (1 << s))) return false;
    return true;
  }

  async write(buf: Uint8Array, offset: number, flags?: WriteFlags): Promise<void> {
    this.checkRw();
    if (flags?.compressed && this.crypto) flags = { ...flags, compressed: false };
    if (flags?.compressed && !this.dataFile && buf.length > this.cs) {
      // cluster by cluster, so incompressible clusters do not stop the others
      for (let d = 0; d < buf.length; d += this.cs) await this.write(buf.subarray(d, d + this.cs), offset + d, flags);
      return;
    }
    if (flags?.compressed && !this.dataFile) {
      const handled = await this.lock.run(() => this.writeCompressed(buf, offset));
      if (handled === buf.length) return;
      buf = buf.subarray(handled);
      offset += handled;
    }
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      // fast path: a run of in-place writable clusters; tracked from the lookup on, so
      // settlePrelinked (behind the gate) sees every write that may still land
      while (this.gate) await this.gate;
      const fast = this.writeInPlace(buf.subarray(done), pos);
      this.fastWrites.add(fast);
      let run: number;
      try { run = await fast; } finally { this.fastWrites.delete(fast); }
      if (run > 0) {
        done += run;
        continue;
      }
      const quick = await this.writeAllocPipelined(buf.subarray(done), pos);
      if (quick < 0) continue; // another request was allocating this cluster: look again
      if (quick > 0) { done += quick; continue; }
      done += await this.lock.run(() => this.writeAlloc(buf.subarray(done), pos));
    }
  }

  /** writes the leading run of clusters that can be overwritten in place; returns its length */
  private async writeInPlace(buf: Uint8Array, pos: number): Promise<number> {
    let run = 0;
    let host = -1;
    for (;;) {
      const p = pos + run;
      if (run >= buf.length) break;
      const gc = Math.floor(p / this.cs);
      const n = Math.min(this.cs - (p % this.cs), buf.length - run);
      const inf = await this.info(gc);
      if (!this.inPlace(inf, p, n)) break;
      const h = inf.host + (p % this.cs);
      if (host >= 0 && h !== host + run) break;
      if (host < 0) host = h;
      run += n;
    }
    if (run === 0) return 0;
    await this.checkOverlap(host, run, pos);
    let data = buf.subarray(0, run);
    if (this.crypto) { data = Buffer.from(data); this.crypto.encrypt(data, host, pos); }
    await this.dataNode.write!(data, host);
    return run;
  }

  // Allocating writes into unallocated (or zero) clusters, pipelined as qemu does: clusters
  // are allocated under the metadata lock, the data is written without it (so requests
  // overlap), and the L2 entries are linked under the lock again. An operation that needs
  // the metadata quiet (snapshot, discard, zeroing...) calls drainFastWrites() under the lock,
  // which waits for the data of every pending allocation and links it itself.
  private allocInflight = new Map<number, Promise<void>>();
  private pendingLinks = new Set<PendingAlloc>();
  /** L2 tables with linked entries not yet on disk (pinned here, so eviction cannot lose them) */
  private dirtyL2 = new Map<number, Buffer>();

  private async writeDirtyL2(): Promise<void> {
    // never an entry pointing at a cluster that was linked ahead and not written
    await this.settlePrelinked();
    await this.refWritesDone();
    for (const [off, buf] of [...this.dirtyL2]) {
      await this.file.write!(buf, off);
      // unpin only after the table is on disk, so a reload can never see the old entries
      if (this.dirtyL2.get(off) === buf) {
        this.dirtyL2.delete(off);
        this.l2Cache.set(off, buf);
      }
    }
  }


  private async writeAllocPipelined(buf: Uint8Array, pos: number): Promise<number> {
    if (this.dataFile || this.extL2) return 0;
    const cs = this.cs;
    const gcFirst = Math.floor(pos / cs);
    const busy = this.allocInflight.get(gcFirst);
    if (busy) { await busy; return -1; }
    let ahead: { offset: number; length: number } | null = null;
    const plan = await this.lock.run(async (): Promise<PendingAlloc | null | 'busy'> => {
      if (this.allocInflight.has(gcFirst)) return 'busy';
      const l1i = Math.floor(gcFirst / this.l2Entries);
      const t = await this.l2ForWrite(l1i);
      const items: PendingAlloc['items'] = [];
      let done = 0;
      while (done < buf.length && items.length < 4096) {
        const p = pos + done;
        const gc = Math.floor(p / cs);
        if (Math.floor(gc / this.l2Entries) !== l1i || this.allocInflight.has(gc)) break;
        const inf = this.decode(t.buf, gc % this.l2Entries);
        if (!(inf.kind === 'unalloc' || (inf.kind === 'zero' && !inf.has))) {
          // linked ahead while this request waited for the lock: an in-place write now
          if (!items.length && this.inPlace(inf, p, Math.min(cs - (p % cs), buf.length))) return 'busy';
          break;
        }
        items.push({ gc, idx: gc % this.l2Entries });
        done += Math.min(cs - (p % cs), buf.length - done);
      }
      if (!items.length) return null;
      await this.markDirty();
      // whole clusters: the rest of a new cluster changes its mapping too (see linkAlloc)
      this.mapInvalidator?.(items[0].gc * cs, Math.min(items.length * cs, this._size - items[0].gc * cs));
      // A write that lands near the last allocating one, or next to a request of its queue
      // still allocating, is taken as part of a sequential stream (requests of a queue arrive
      // slightly out of order); so is a large write right after allocated data, and a write
      // at the start of an empty L2 table (the first write of a guest filling an empty disk:
      // its queue's next requests find the window mapped already). A small write after
      // allocated data alone is not: random writes into a filling disk often are, and each
      // would link a window only for the next one to give it back.
      const prev = gcFirst - 1;
      const near = Math.abs(pos - this.streamEnd) <= STREAM_SLACK;
      const continues = near || (prev >= 0 && (this.allocInflight.has(prev) || (done >= STREAM_LARGE_WRITE &&
        Math.floor(prev / this.l2Entries) === l1i && this.decode(t.buf, prev % this.l2Entries).kind === 'normal'))) ||
        (gcFirst % this.l2Entries === 0 && allZero(t.buf, 0, t.buf.length));
      // (requests of the same stream that arrive late land near a window: not a break)
      const nearWindow = this.prelinked.some((ch) => pos >= ch.entries[0].gc * cs - STREAM_SLACK &&
        pos <= (ch.entries[ch.entries.length - 1].gc + 1) * cs + STREAM_SLACK);
      if (!continues && !nearWindow && this.prelinked.length) {
        // the stream ended: give its unwritten window back, so new data fills the gap
        // instead of leaving a hole in the middle of the file
        await this.settlePrelinked();
        await this.releasePool();
      }
      const host0 = await this.allocDataClusters(items.length);
      if (!continues) this.prelinkGrow = 0;
      else if (!this.prelinkGrow) this.prelinkGrow = Math.max(2, Math.ceil(PRELINK_FIRST_BYTES / cs));
      this.streamEnd = Math.max(near ? this.streamEnd : 0, pos + done);
      ahead = continues ? await this.prelink(t, l1i, items[items.length - 1].gc + 1) : null;
      if (ahead) this.streamEnd = Math.max(this.streamEnd, ahead.offset + ahead.length);
      let release!: () => void;
      const settled = new Promise<void>((r) => { release = r; });
      for (const it of items) this.allocInflight.set(it.gc, settled);
      const plan: PendingAlloc = { items, host0, l2off: t.off, pos, done, dataWritten: Promise.resolve(), linked: false, release };
      // the data write starts before the lock is released, so whoever takes the lock next and
      // settles pending allocations waits for exactly this write
      plan.dataWritten = this.writePlannedData(plan, buf);
      plan.dataWritten.catch(() => undefined);
      this.pendingLinks.add(plan);
      return plan;
    });
    if (plan === 'busy') return -1;
    if (!plan) return 0;
    try {
      await plan.dataWritten;
      await this.lock.run(() => this.linkAlloc(plan));
    } finally {
      this.finishAlloc(plan);
    }
    return plan.done;
  }

  private async writePlannedData(plan: PendingAlloc, buf: Uint8Array): Promise<void> {
    const cs = this.cs;
    const head = plan.pos % cs;
    const total = plan.items.length * cs;
    const tail = total - head - plan.done;
    let data: Uint8Array;
    if (!head && !tail && !this.crypto) {
      data = buf.subarray(0, plan.done); // whole clusters straight from the request
    } else {
      const span = Buffer.alloc(total);
      const cStart = plan.pos - head;
      if (head) await this.oldView(span.subarray(0, head), cStart);
      if (tail) await this.oldView(span.subarray(head + plan.done), plan.pos + plan.done);
      span.set(buf.subarray(0, plan.done), head);
      this.crypto?.encrypt(span, plan.host0, cStart);
      data = span;
    }
    await this.checkOverlap(plan.host0, data.length, plan.pos);
    await this.dataNode.write!(data, plan.host0);
  }

  /** points the L2 entries at the written clusters (under the metadata lock) */
  private async linkAlloc(plan: PendingAlloc): Promise<void> {
    if (plan.linked) return;
    plan.linked = true;
    this.pendingLinks.delete(plan);
    const l2 = await this.loadL2(plan.l2off);
    plan.items.forEach((it, i) => this.setL2(l2, it.idx, plan.host0 + i * this.cs, true, false));
    // Written back at the next flush (or before any operation that needs the metadata quiet),
    // as qemu's writeback L2 cache: the refcounts and the data are on disk already, so a crash
    // before then loses the unflushed writes and leaks their clusters, nothing worse.
    this.dirtyL2.set(plan.l2off, l2);
    // a map learnt while the data was in flight saw the old (unallocated) state; whole
    // clusters, since a zero entry learnt for the untouched rest of a cluster is stale as
    // well once later in-place writes (which do not invalidate) land there
    this.mapInvalidator?.(plan.items[0].gc * this.cs, Math.min(plan.items.length * this.cs, this._size - plan.items[0].gc * this.cs));
  }

  private finishAlloc(plan: PendingAlloc): void {
    this.pendingLinks.delete(plan);
    for (const it of plan.items) if (this.allocInflight.get(it.gc)) this.allocInflight.delete(it.gc);
    plan.release();
  }

  /** under the metadata lock: waits for pending allocations' data and links them */
  private async settlePendingAllocs(): Promise<void> {
    for (const plan of [...this.pendingLinks]) {
      try {
        await plan.dataWritten;
        await this.linkAlloc(plan);
      } catch {
        // its writer reports the error; the clusters stay unreferenced (a leak, as in qemu)
        plan.linked = true;
        this.pendingLinks.delete(plan);
      }
    }
  }

  // Compressed clusters (convert -c), as qemu writes them: whole unallocated clusters only,
  // packed at byte granularity into host clusters; every host cluster a compressed cluster
  // touches gets one reference per user. Returns how many leading bytes were handled; the
  // rest (partial or allocated clusters, incompressible data) takes the normal path.
  private compFree = { off: 0, end: 0 };

  private async writeCompressed(buf: Uint8Array, offset: number): Promise<number> {
    const cs = this.cs;
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const n = Math.min(cs, buf.length - done);
      const lastPartial = pos + n === this._size && n < cs;
      if (pos % cs || (n < cs && !lastPartial)) break;
      const gc = pos / cs;
      const inf = await this.info(gc);
      if (inf.kind !== 'unalloc' || inf.has) break;
      const plain = Buffer.alloc(cs);
      plain.set(buf.subarray(done, done + n));
      const packed = this.hdr.compressionType === 1 ? zstdCompress(plain)
        : zlib.deflateRawSync(plain, { windowBits: 12, level: zlib.constants.Z_DEFAULT_COMPRESSION, memLevel: 9 });
      if (!packed || packed.length >= cs - 512) break; // not worth it: stored uncompressed
      await this.markDirty();
      let host: number;
      if (this.compFree.end - this.compFree.off >= packed.length && Math.floor(this.compFree.off / cs) === Math.floor((this.compFree.off + packed.length - 1) / cs)) {
        host = this.compFree.off;
        await this.updateRefcount(host - (host % cs), cs, 1);
      } else {
        const clusters = Math.ceil(packed.length / cs);
        host = await this.allocClusters(clusters);
        this.compFree = { off: host, end: host + clusters * cs };
      }
      this.compFree.off = host + packed.length;
      await this.checkOverlap(host, packed.length, pos);
      await this.file.write!(packed, host);
      const x = 62 - (this.cb - 8);
      const nbSectors = Math.floor((host + packed.length - 1) / 512) - Math.floor(host / 512);
      const entry = BigInt(host) | (BigInt(nbSectors) << BigInt(x)) | (1n << 62n);
      const l1i = Math.floor(gc / this.l2Entries);
      this.mapInvalidator?.(pos, cs);
      const t = await this.l2ForWrite(l1i);
      const idx = gc % this.l2Entries;
      t.buf.writeBigUInt64BE(entry, idx * this.es);
      if (this.extL2) { t.buf.writeUInt32BE(0, idx * this.es + 8); t.buf.writeUInt32BE(0, idx * this.es + 12); }
      await this.writeL2Range(t, idx, idx + 1);
      done += n;
    }
    return done;
  }

  /** waits for in-place data writes that may target clusters about to be freed or shared */
  async drainFastWrites(): Promise<void> {
    await this.settlePendingAllocs();
    await this.settlePrelinked();
    await this.releasePool();
    await this.writeDirtyL2();
    while (this.fastWrites.size) await Promise.allSettled([...this.fastWrites]);
  }

  /** makes the L2 table for l1 index writable (allocated, refcount 1) */
  async l2ForWrite(l1i: number): Promise<{ buf: Buffer; off: number }> {
    if (l1i * 8 >= this.l1.length) throw new ImgError('range', 'qcow2: L1 index beyond the L1 table');
    const { off, copied } = this.l1Entry(l1i);
    if (off && copied) return { buf: await this.loadL2(off), off };
    const content = off ? Buffer.from(await this.loadL2(off)) : Buffer.alloc(this.cs);
    const newOff = await this.allocClusters(1);
    await this.file.write!(content, newOff);
    this.l2Cache.set(newOff, content);
    await this.setL1(l1i, newOff, true);
    if (off) {
      await this.updateRefcount(off, this.cs, -1);
      if ((await this.refcount(off / this.cs)) === 0) { this.l2Cache.drop(off); this.dirtyL2.delete(off); }
    }
    return { buf: content, off: newOff };
  }

  async setL1(l1i: number, off: number, copied: boolean): Promise<void> {
    this.metaClusters = null;
    writeEntry(this.l1, l1i * 8, off, copied ? OFLAG_COPIED : 0);
    await this.file.write!(this.l1.subarray(l1i * 8, l1i * 8 + 8), this.hdr.l1TableOffset + l1i * 8);
  }

  private async writeL2Range(t: { buf: Buffer; off: number }, i0: number, i1: number): Promise<void> {
    await this.file.write!(t.buf.subarray(i0 * this.es, i1 * this.es), t.off + i0 * this.es);
  }

  private setL2(buf: Buffer, idx: number, host: number, copied: boolean, zeroFlag: boolean, alloc = 0, zero = 0): void {
    const at = idx * this.es;
    writeEntry(buf, at, host, copied ? OFLAG_COPIED : 0, zeroFlag ? 1 : 0);
    if (this.extL2) {
      buf.writeUInt32BE(zero >>> 0, at + 8);
      buf.writeUInt32BE(alloc >>> 0, at + 12);
    }
  }

  /** the current guest view of [off, off+len) of this image (backing included) */
  private async oldView(dst: Buffer, off: number): Promise<void> {
    const inImage = Math.max(0, Math.min(dst.length, this._size - off));
    if (inImage > 0) await readChain(this, dst.subarray(0, inImage), off);
    if (inImage < dst.length) dst.fill(0, inImage);
  }

  /** writes clusters that need allocation, COW or bitmap changes; returns bytes handled */
  private async writeAlloc(buf: Uint8Array, pos: number): Promise<number> {
    await this.markDirty();
    const cs = this.cs;
    const gc0 = Math.floor(pos / cs);
    const l1i = Math.floor(gc0 / this.l2Entries);
    const t = await this.l2ForWrite(l1i);
    interface Item { idx: number; inf: L2Info; start: number; n: number; dataOff: number; s: number; e: number; reuse: boolean; host: number; alloc: number; zero: number }
    const items: Item[] = [];
    let done = 0;
    while (done < buf.length && items.length < 4096) {
      const p = pos + done;
      const gc = Math.floor(p / cs);
      if (Math.floor(gc / this.l2Entries) !== l1i) break;
      const idx = gc % this.l2Entries;
      const inf = this.decode(t.buf, idx);
      const n = Math.min(cs - (p % cs), buf.length - done);
      if (items.length && this.inPlace(inf, p, n)) break;
      const cStart = gc * cs;
      let reuse: boolean;
      let host = 0;
      if (this.dataFile) {
        reuse = true;
        host = inf.kind !== 'compressed' && inf.has ? inf.host : cStart;
      } else {
        reuse = inf.kind !== 'compressed' && inf.has && inf.copied;
        host = reuse ? inf.host : 0;
      }
      let s: number, e: number;
      let alloc = ALL32, zero = 0;
      if (this.extL2) {
        const sc0 = Math.floor((p - cStart) / this.scSize);
        const sc1 = Math.floor((p - cStart + n - 1) / this.scSize);
        let mask = 0;
        for (let k = sc0; k <= sc1; k++) mask |= 1 << k;
        if (inf.kind === 'compressed') {
          s = cStart; e = cStart + cs; alloc = ALL32; zero = 0;
        } else if (!reuse && inf.has) {
          // shared cluster: copy it whole, keep its bitmap
          s = cStart; e = cStart + cs; alloc = (inf.alloc | mask) >>> 0; zero = (inf.zero & ~mask) >>> 0;
        } else {
          s = cStart + sc0 * this.scSize; e = cStart + (sc1 + 1) * this.scSize;
          alloc = (inf.alloc | mask) >>> 0; zero = (inf.zero & ~mask) >>> 0;
        }
      } else if (reuse && inf.kind === 'normal') {
        s = p; e = p + n;
      } else {
        s = cStart; e = cStart + cs;
      }
      items.push({ idx, inf, start: p, n, dataOff: done, s, e, reuse, host, alloc, zero });
      done += n;
    }
    const newCount = items.filter((it) => !it.reuse).length;
    // whole clusters: the COW'd rest of a newly allocated cluster changes its mapping too (a map
    // entry learnt for it as zero/unallocated must go, even if nothing mappable replaces it)
    const invEnd = Math.min(Math.ceil((pos + done) / cs) * cs, this._size);
    this.mapInvalidator?.(gc0 * cs, invEnd - gc0 * cs);
    if (newCount) {
      let h = await this.allocClusters(newCount);
      for (const it of items) if (!it.reuse) { it.host = h; h += cs; }
    }
    // build and write data, merging host-contiguous spans
    let group: Buffer[] = [];
    let gStart = -1, gEnd = -1;
    const flushGroup = async (): Promise<void> => {
      if (!group.length) return;
      const data = group.length === 1 ? group[0] : Buffer.concat(group);
      await this.checkOverlap(gStart, data.length, pos);
      await this.dataNode.write!(data, gStart);
      group = [];
    };
    for (const it of items) {
      const span = Buffer.alloc(it.e - it.s);
      const head = it.start - it.s;
      const tail = it.e - (it.start + it.n);
      if (head > 0) await this.oldView(span.subarray(0, head), it.s);
      if (tail > 0) await this.oldView(span.subarray(head + it.n), it.start + it.n);
      span.set(buf.subarray(it.dataOff, it.dataOff + it.n), head);
      const hs = it.host + (it.s % cs);
      this.crypto?.encrypt(span, hs, it.s);
      if (hs !== gEnd) { await flushGroup(); gStart = hs; }
      group.push(span);
      gEnd = hs + span.length;
    }
    await flushGroup();
    // L2 entries, then drop the old references
    for (const it of items) {
      this.setL2(t.buf, it.idx, it.host, true, false, this.extL2 ? it.alloc : 0, this.extL2 ? it.zero : 0);
    }
    await this.writeL2Range(t, items[0].idx, items[items.length - 1].idx + 1);
    for (const it of items) {
      if (!it.reuse && (it.inf.kind === 'compressed' || it.inf.has)) await this.freeEntry(it.inf);
    }
    return done;
  }

  async writeZeroes(offset: number, length: number, flags?: ZeroFlags): Promise<void> {
    this.checkRw();
    const end = offset + length;
    const useFlag = this.hdr.version >= 3 && !this.dataFileRaw;
    let pos = offset;
    while (pos < end) {
      const unit = this.extL2 ? this.scSize : this.cs;
      const aligned = pos % unit === 0;
      const gcEnd = (Math.floor(pos / this.cs) + 1) * this.cs;
      const chunkEnd = Math.min(end, gcEnd);
      if (useFlag && aligned && (chunkEnd - pos) >= unit) {
        const full = Math.floor((chunkEnd - pos) / unit) * unit;
        await this.lock.run(() => this.zeroRange(pos, full, !!flags?.mayUnmap));
        pos += full;
        continue;
      }
      // partial: write real zeros
      const n = useFlag ? Math.min(chunkEnd, Math.ceil((pos + 1) / unit) * unit) - pos : chunkEnd - pos;
      await this.write(Buffer.alloc(n), pos);
      pos += n;
    }
  }

  /** makes [pos, pos+len) (within one cluster, unit-aligned) read as zeros; full clusters are deallocated */
  private async zeroRange(pos: number, len: number, _unmap: boolean): Promise<void> {
    await this.markDirty();
    await this.drainFastWrites();
    const gc = Math.floor(pos / this.cs);
    const l1i = Math.floor(gc / this.l2Entries);
    this.mapInvalidator?.(pos, len);
    const t = await this.l2ForWrite(l1i);
    const idx = gc % this.l2Entries;
    const inf = this.decode(t.buf, idx);
    if (len === this.cs) {
      if (this.extL2) this.setL2(t.buf, idx, 0, false, false, 0, ALL32);
      else this.setL2(t.buf, idx, 0, false, true);
      await this.writeL2Range(t, idx, idx + 1);
      if (inf.kind === 'compressed' || inf.has) await this.freeEntry(inf);
      return;
    }
    // extended L2, whole subclusters
    const inC = pos % this.cs;
    let mask = 0;
    for (let k = inC / this.scSize; k < (inC + len) / this.scSize; k++) mask |= 1 << k;
    if (inf.kind === 'compressed' || (inf.has && !inf.copied)) {
      // needs COW first: write zeros through the normal path
      await this.writeAlloc(Buffer.alloc(len), pos);
      return;
    }
    this.setL2(t.buf, idx, inf.host, inf.has, false, (inf.alloc & ~mask) >>> 0, (inf.zero | mask) >>> 0);
    await this.writeL2Range(t, idx, idx + 1);
  }

  async discard(offset: number, length: number): Promise<void> {
    this.checkRw();
    if (this.dataFileRaw) return;
    const cs = this.cs;
    let pos = Math.ceil(offset / cs) * cs;
    const end = Math.floor((offset + length) / cs) * cs;
    while (pos < end) {
      const p = pos;
      await this.lock.run(async () => {
        await this.markDirty();
        await this.drainFastWrites();
        const gc = Math.floor(p / cs);
        const l1i = Math.floor(gc / this.l2Entries);
        const inf = await this.info(gc);
        if (inf.kind === 'unalloc' && !(this.extL2 && inf.zero) && (!this.backing || this.hdr.version < 3)) return;
        if (inf.kind === 'zero' && !inf.has && (!this.extL2 || inf.zero === ALL32)) return;
        this.mapInvalidator?.(p, cs);
        const t = await this.l2ForWrite(l1i);
        const idx = gc % this.l2Entries;
        if (this.hdr.version >= 3 || this.backing) {
          if (this.extL2) this.setL2(t.buf, idx, 0, false, false, 0, ALL32);
          else this.setL2(t.buf, idx, 0, false, this.hdr.version >= 3);
        } else this.setL2(t.buf, idx, 0, false, false);
        await this.writeL2Range(t, idx, idx + 1);
        await this.freeEntry(inf);
      });
      pos += cs;
    }
  }

  async flush(): Promise<void> {
    await this.lock.run(async () => {
      await this.settlePendingAllocs();
      await this.settlePrelinked();
      if (!this.readOnly) await this.releasePool();
      await this.writeDirtyL2();
      if (this.dataFile?.flush && !this.dataFile.readOnly) await this.dataFile.flush();
      if (!this.readOnly && this.file.flush) await this.file.flush();
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      if (!this.readOnly && !this.isSnapshotView) {
        await this.drainFastWrites();
        await this.flush();
        if (this.dirtySet) {
          this.hdr.incompatible &= ~INCOMPAT_DIRTY;
          await this.writeFeatureBits();
          await this.file.flush?.();
        }
      }
    } finally {
      if (!this.isSnapshotView) {
        await this.dataFile?.close();
        await this.backing?.close();
        await this.file.close();
      }
    }
  }

  async allocatedSize(): Promise<number> {
    const a = this.file.allocatedSize ? await this.file.allocatedSize() : this.file.size;
    return a;
  }

  async resetCaches(): Promise<void> {
    this.l2Cache.clear();
    this.refCache.clear();
    this.lastCompressed = null;
  }

  // ---------------------------------------------------------------- info

  async infoExtra(): Promise<Record<string, unknown>> {
    const r: Record<string, unknown> = { 'cluster-size': this.cs };
    if (this.hdr.backingFile !== null) {
      r['backing-filename'] = this.hdr.backingFile;
      r['full-backing-filename'] = fullBackingName(this.hdr.backingFile, this.file.filename);
      if (this.hdr.backingFormat) r['backing-filename-format'] = this.hdr.backingFormat;
    }
    r['dirty-flag'] = !!(this.hdr.incompatible & INCOMPAT_DIRTY);
    if (this.hdr.cryptMethod) r.encrypted = true;
    return r;
  }

  async formatSpecific(): Promise<{ type: string; data: Record<string, unknown> }> {
    const h = this.hdr;
    const data: Record<string, unknown> = { compat: h.version >= 3 ? '1.1' : '0.10', 'compression-type': h.compressionType === 1 ? 'zstd' : 'zlib' };
    if (h.version >= 3) {
      data['lazy-refcounts'] = !!(h.compatible & COMPAT_LAZY_REFCOUNTS);
      data['refcount-bits'] = 1 << h.refcountOrder;
      if (h.dataFile !== null) {
        data['data-file'] = h.dataFile;
        data['data-file-raw'] = !!(h.autoclear & AUTOCLEAR_DATA_FILE_RAW);
      }
      data.corrupt = !!(h.incompatible & INCOMPAT_CORRUPT);
      data['extended-l2'] = this.extL2;
    } else {
      data['refcount-bits'] = 1 << h.refcountOrder;
    }
    if (this.crypto) data.encrypt = this.crypto.info;
    return { type: 'qcow2', data };
  }

  // ---------------------------------------------------------------- header rewrite

  async writeHeader(): Promise<void> {
    const b = serializeHeader(this.hdr);
    const full = Buffer.alloc(Math.max(b.length, Math.min(this.cs, Math.max(this.file.size, b.length))));
    b.copy(full);
    // keep only the first cluster: header, extensions and backing name live there
    await this.file.write!(full.subarray(0, Math.min(full.length, this.cs)), 0);
    // re-derive header-dependent fields (backing offset) from what we wrote
    this.hdr.headerLength = this.hdr.version >= 3 ? 112 : 72;
  }

  async setBacking(filename: string | null, format: string | null): Promise<void> {
    this.checkRw();
    await this.lock.run(async () => {
      this.hdr.backingFile = filename;
      this.hdr.backingFormat = filename ? format : null;
      await this.writeHeader();
      await this.file.flush?.();
    });
  }

  async makeEmpty(): Promise<void> {
    this.checkRw();
    await this.lock.run(async () => {
      await this.drainFastWrites();
      this.mapInvalidator?.(0, this._size);
      for (let i = 0; i < this.l1.length / 8; i++) {
        const { off } = this.l1Entry(i);
        if (!off) continue;
        const l2 = await this.loadL2(off);
        const infos: L2Info[] = [];
        for (let k = 0; k < this.l2Entries; k++) infos.push(this.decode(l2, k));
        await this.setL1(i, 0, false);
        for (const inf of infos) if (inf.kind === 'compressed' || inf.has) await this.freeEntry(inf);
        await this.updateRefcount(off, this.cs, -1);
        { this.l2Cache.drop(off); this.dirtyL2.delete(off); }
      }
      await this.file.flush?.();
    });
  }

  // ---------------------------------------------------------------- snapshots (see snapshot.ts)

  async snapshots(): Promise<SnapshotInfo[]> {
    return this.snapshotsList.map((s) => ({
      id: s.id, name: s.name, vmStateSize: s.vmStateSize, dateSec: s.dateSec, dateNsec: s.dateNsec,
      vmClockNsec: s.vmClockNsec, icount: s.icount,
    }));
  }

  findSnapshot(idOrTag: string): Snapshot {
    const s = this.snapshotsList.find((x) => x.id === idOrTag) ?? this.snapshotsList.find((x) => x.name === idOrTag);
    if (!s) throw new ImgError('usage', `Can't find the snapshot '${idOrTag}'`);
    return s;
  }

  /** walks an L1 table (at offset, size entries; or the active one), adding `addend` to the
   *  refcounts of its L2 tables and clusters, and fixing QCOW_OFLAG_COPIED everywhere */
  async updateSnapshotRefcount(l1Offset: number, l1Size: number, addend: number): Promise<void> {
    const active = l1Offset === this.hdr.l1TableOffset;
    const l1 = active ? this.l1 : Buffer.alloc(l1Size * 8);
    if (!active) await this.file.read(l1, l1Offset);
    let l1Changed = false;
    for (let i = 0; i < l1Size; i++) {
      const [hi, lo] = readEntry(l1, i * 8);
      const l2off = entryOffset(hi, lo);
      if (!l2off) continue;
      if (l2off % this.cs) throw this.corrupt(`L2 table offset 0x${l2off.toString(16)} unaligned`);
      const l2 = await this.loadL2(l2off);
      let changed = false;
      for (let k = 0; k < this.l2Entries; k++) {
        const inf = this.decode(l2, k);
        if (inf.kind === 'compressed') {
          if (addend) {
            const r = this.compressedRange(inf);
            await this.updateRefcount(r.off - (r.off & 511), r.nbBytes, addend);
          }
          continue;
        }
        if (!inf.has) continue;
        let rc = 1;
        if (!this.dataFile) {
          if (addend) await this.updateRefcount(inf.host, this.cs, addend);
          rc = await this.refcount(inf.host / this.cs);
        }
        const want = rc === 1;
        if (want !== inf.copied) {
          const at = k * this.es;
          l2.writeUInt32BE(want ? (inf.hi | OFLAG_COPIED) >>> 0 : (inf.hi & ~OFLAG_COPIED) >>> 0, at);
          changed = true;
        }
      }
      if (changed) await this.file.write!(l2, l2off);
      if (addend) await this.updateRefcount(l2off, this.cs, addend);
      const rc = await this.refcount(l2off / this.cs);
      const want = rc === 1;
      if (want !== ((hi & OFLAG_COPIED) !== 0)) {
        l1.writeUInt32BE(want ? (hi | OFLAG_COPIED) >>> 0 : (hi & ~OFLAG_COPIED) >>> 0, i * 8);
        l1Changed = true;
      }
    }
    if (l1Changed && active) await this.file.write!(this.l1, this.hdr.l1TableOffset);
    else if (l1Changed && addend === 0) await this.file.write!(l1, l1Offset);
  }

  async writeSnapshotTable(list: Snapshot[]): Promise<void> {
    const buf = writeSnapshotTableBuf(list);
    const oldOff = this.hdr.snapshotsOffset;
    const oldSize = this.hdr.nbSnapshots ? (await this.snapshotTableSize()) : 0;
    let newOff = 0;
    if (list.length) {
      newOff = await this.allocClusters(Math.ceil(buf.length / this.cs));
      await this.file.write!(buf, newOff);
      await this.file.flush?.();
    }
    const hb = Buffer.alloc(12);
    hb.writeUInt32BE(list.length, 0);
    hb.writeBigUInt64BE(BigInt(newOff), 4);
    await this.file.write!(hb, 60);
    await this.file.flush?.();
    this.hdr.nbSnapshots = list.length;
    this.hdr.snapshotsOffset = newOff;
    if (oldSize) await this.updateRefcount(oldOff, oldSize, -1);
    this.snapshotsList = list;
  }

  async snapshotTableSize(): Promise<number> {
    return writeSnapshotTableBuf(this.snapshotsList).length;
  }

  async snapshotCreate(tag: string): Promise<void> {
    this.checkRw();
    if (this.dataFile) throw new ImgError('unsupported', 'qcow2: internal snapshots are not supported with an external data file');
    await this.lock.run(async () => {
      if (this.snapshotsList.some((s) => s.name === tag)) throw new ImgError('usage', `qcow2: a snapshot named '${tag}' already exists`);
      if (this.snapshotsList.length >= 65536) throw new ImgError('image', 'Too many snapshots');
      await this.drainFastWrites();
      this.mapInvalidator?.(0, this._size);
      const l1Size = this.l1.length / 8;
      const l1Off = l1Size ? await this.allocClusters(Math.ceil((l1Size * 8) / this.cs)) : 0;
      await this.updateSnapshotRefcount(this.hdr.l1TableOffset, l1Size, 1);
      if (l1Size) await this.file.write!(this.l1, l1Off);
      const now = Date.now();
      const ids = this.snapshotsList.map((s) => Number(s.id)).filter((n) => Number.isFinite(n));
      const sn: Snapshot = {
        l1Offset: l1Off, l1Size, id: String((ids.length ? Math.max(...ids) : 0) + 1), name: tag,
        dateSec: Math.floor(now / 1000), dateNsec: (now % 1000) * 1e6, vmClockNsec: 0, vmStateSize: 0,
        diskSize: this._size, icount: undefined, extra: Buffer.alloc(0),
      };
      await this.writeSnapshotTable([...this.snapshotsList, sn]);
      await this.file.flush?.();
    });
  }

  async snapshotDelete(idOrTag: string): Promise<void> {
    this.checkRw();
    await this.lock.run(async () => {
      const sn = this.findSnapshot(idOrTag);
      await this.drainFastWrites();
      this.mapInvalidator?.(0, this._size);
      await this.writeSnapshotTable(this.snapshotsList.filter((s) => s !== sn));
      await this.updateSnapshotRefcount(sn.l1Offset, sn.l1Size, -1);
      if (sn.l1Size) await this.updateRefcount(sn.l1Offset, sn.l1Size * 8, -1);
      await this.updateSnapshotRefcount(this.hdr.l1TableOffset, this.l1.length / 8, 0);
      await this.file.flush?.();
    });
  }

  async snapshotApply(idOrTag: string): Promise<void> {
    this.checkRw();
    await this.lock.run(async () => {
      const sn = this.findSnapshot(idOrTag);
      await this.drainFastWrites();
      this.mapInvalidator?.(0, Math.max(this._size, sn.diskSize));
      if (sn.l1Size > this.l1.length / 8) await this.growL1(sn.l1Size);
      const snL1 = Buffer.alloc(sn.l1Size * 8);
      if (sn.l1Size) await this.file.read(snL1, sn.l1Offset);
      // take references for the snapshot's clusters, install its L1, drop the old ones
      await this.updateSnapshotRefcount(sn.l1Offset, sn.l1Size, 1);
      const oldL1 = Buffer.from(this.l1);
      const newL1 = Buffer.alloc(this.l1.length);
      snL1.copy(newL1);
      await this.file.write!(newL1, this.hdr.l1TableOffset);
      await this.file.flush?.();
      this.l1 = newL1;
      // old active tables: drop references through a temporary copy of the old L1
      const tmpOff = await this.allocClusters(Math.ceil(oldL1.length / this.cs) || 1);
      await this.file.write!(oldL1, tmpOff);
      await this.updateSnapshotRefcount(tmpOff, oldL1.length / 8, -1);
      await this.updateRefcount(tmpOff, (Math.ceil(oldL1.length / this.cs) || 1) * this.cs, -1);
      await this.updateSnapshotRefcount(this.hdr.l1TableOffset, this.l1.length / 8, 0);
      if (sn.diskSize !== this._size) {
        this._size = sn.diskSize;
        this.hdr.size = sn.diskSize;
        const b = Buffer.alloc(8);
        b.writeBigUInt64BE(BigInt(sn.diskSize), 0);
        await this.file.write!(b, 24);
      }
      this.l2Cache.clear();
      await this.file.flush?.();
    });
  }

  /** moves the active L1 table to a bigger place */
  async growL1(entries: number): Promise<void> {
    if (entries * 8 > MAX_L1_BYTES) throw new ImgError('image', 'Active L1 table too large');
    const bytes = entries * 8;
    const newOff = await this.allocClusters(Math.ceil(bytes / this.cs));
    const nl1 = Buffer.alloc(bytes);
    this.l1.copy(nl1);
    await this.file.write!(nl1, newOff);
    await this.file.flush?.();
    const hb = Buffer.alloc(12);
    hb.writeUInt32BE(entries, 0);
    hb.writeBigUInt64BE(BigInt(newOff), 4);
    await this.file.write!(hb, 36);
    const oldOff = this.hdr.l1TableOffset;
    const oldBytes = this.l1.length;
    this.hdr.l1TableOffset = newOff;
    this.hdr.l1Size = entries;
    this.l1 = nl1;
    if (oldBytes) await this.updateRefcount(oldOff, Math.ceil(oldBytes / this.cs) * this.cs, -1);
  }

  async openSnapshot(idOrTag: string): Promise<BlockNode> {
    const sn = this.findSnapshot(idOrTag);
    if (sn.l1Size * 8 > MAX_L1_BYTES) throw new ImgError('image', 'Snapshot L1 table too large');
    const v = new Qcow2Node({
      file: this.file, header: { ...this.hdr }, readOnly: true, backing: this.backing, dataFile: this.dataFile,
      filename: this.filenameStr, l2CacheBytes: 4 << 20, refCacheBytes: 1 << 20,
      snapshotL1: { offset: sn.l1Offset, size: sn.l1Size, diskSize: sn.diskSize }, crypto: this.crypto,
    });
    await v.init({ offset: sn.l1Offset, size: sn.l1Size });
    return v;
  }

  /** grows the virtual disk (shrinking is not supported) */
  async truncate(size: number): Promise<void> {
    this.checkRw();
    await this.lock.run(async () => {
      if (size < this._size) throw new ImgError('unsupported', 'qcow2: shrinking an image is not supported');
      const need = Math.ceil(size / (this.cs * this.l2Entries));
      if (need > this.l1.length / 8) await this.growL1(need);
      const b = Buffer.alloc(8);
      b.writeBigUInt64BE(BigInt(size), 0);
      await this.file.write!(b, 24);
      this.hdr.size = size;
      this._size = size;
      await this.file.flush?.();
    });
  }
}

export function fullBackingName(backing: string, image: string): string {
  if (backing.startsWith('/') || /^[a-z+]+:/.test(backing) || backing.startsWith('json:')) return backing;
  const slash = image.lastIndexOf('/');
  return slash < 0 ? backing : image.slice(0, slash + 1) + backing;
}

interface ZstdStream {
  on(ev: 'data', fn: (c: Buffer) => void): void;
  on(ev: 'error', fn: (e: Error) => void): void;
  on(ev: 'end', fn: () => void): void;
  end(b: Buffer): void;
  destroy(): void;
}
let zstdMod: { DecompressStream: new () => ZstdStream; compress?: (b: Buffer) => Buffer } | null | undefined;

/** one zstd frame, or null when zstd is unavailable (the caller stores the cluster plainly) */
function zstdCompress(b: Buffer): Buffer | null {
  if (zstdMod === undefined) {
    try {
      // eslint-disable-next-line @typescript-eslint/no-var-requires
      zstdMod = require('zstd-napi');
    } catch {
      zstdMod = null;
    }
  }
  return zstdMod?.compress ? zstdMod.compress(b) : null;
}

/** zstd data in a qcow2 cluster is one frame followed by padding up to the sector end
 *  (qemu decompresses with a stream until the cluster is full); so do we. */
async function zstdDecompress(src: Buffer, cs: number): Promise<Buffer> {
  if (zstdMod === undefined) {
    try {
      // optional dependency (Node 20's zlib has no zstd)
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      zstdMod = require('zstd-napi') as { DecompressStream: new () => ZstdStream };
    } catch {
      zstdMod = null;
    }
  }
  if (!zstdMod) throw new ImgError('unsupported', 'qcow2: zstd-compressed clusters need the optional zstd-napi package');
  const stream = new zstdMod.DecompressStream();
  return new Promise<Buffer>((resolve, reject) => {
    const chunks: Buffer[] = [];
    let got = 0;
    let settled = false;
    const finish = (err?: Error): void => {
      if (settled) return;
      settled = true;
      if (got >= cs) resolve(Buffer.concat(chunks).subarray(0, cs));
      else reject(err ?? new Error(`zstd data ended after ${got} bytes`));
      stream.destroy();
    };
    stream.on('data', (c) => {
      chunks.push(c);
      got += c.length;
      if (got > cs * 2) finish(new Error('zstd data is larger than a cluster'));
      else if (got >= cs) finish();
    });
    stream.on('error', (e) => finish(e));
    stream.on('end', () => finish());
    stream.end(src);
  });
}
