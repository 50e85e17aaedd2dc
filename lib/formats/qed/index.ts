// QED (QEMU Enhanced Disk): header, two-level cluster tables, allocation at the end of the file,
// the need-check bit around allocating writes, consistency check and creation.
import { ImgError } from '../../core/errors';
import { readBacking } from '../../core/io';
import type {
  BlockNode, CheckResult, CreateContext, Extent, FormatDriver, MapInvalidator, OpenContext, Preallocation, WriteFlags, ZeroFlags,
} from '../../core/node';
import { OptionReader } from '../../core/options';
import { createFile, FileNode, withFileRw } from '../../protocols/file';
import { Mutex } from '../qcow2/util';
import { PageCache } from './pagecache';
import { fullBackingName } from '../qcow2/node';

const MAGIC = 0x00444551; // 'QED\0' little-endian
const F_BACKING_FILE = 1;
const F_NEED_CHECK = 2;
const F_NO_PROBE = 4;
const FEATURE_MASK = F_BACKING_FILE | F_NEED_CHECK | F_NO_PROBE;
const MIN_CS = 4096;
const MAX_CS = 64 * 1024 * 1024;
const MAX_TS = 16;
const HEADER_LEN = 64;
const PAGE = 65536; // table bytes cached per entry
const CACHE_BYTES = 16 << 20;
const ZERO_CLUSTER = 1;
const MAX_BATCH = 16 << 20;
/** lookups one block status call may merge (callers ask again for the rest) */
const MAX_STATUS_STEPS = 16384;
const INT_MAX = 0x7fffffff;

export interface QedHeader {
  clusterSize: number;
  tableSize: number;
  headerSize: number;
  features: number;
  compat: bigint;
  autoclear: bigint;
  l1Offset: number;
  imageSize: number;
  backingOffset: number;
  backingSize: number;
}

const pow2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;
const bad = (msg: string): ImgError => new ImgError('image', `qed: ${msg}`);

function u64(b: Buffer, at: number, what: string): number {
  const v = b.readBigUInt64LE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw bad(`${what} is out of range`);
  return Number(v);
}

export function parseHeader(b: Buffer): QedHeader {
  if (b.length < HEADER_LEN || b.readUInt32LE(0) !== MAGIC) throw new ImgError('image', 'Image not in QED format');
  const features = b.readBigUInt64LE(16);
  if (features & ~BigInt(FEATURE_MASK)) throw bad(`Unsupported QED features 0x${(features & ~BigInt(FEATURE_MASK)).toString(16)}`);
  return {
    clusterSize: b.readUInt32LE(4),
    tableSize: b.readUInt32LE(8),
    headerSize: b.readUInt32LE(12),
    features: Number(features),
    compat: b.readBigUInt64LE(24),
    autoclear: b.readBigUInt64LE(32),
    l1Offset: u64(b, 40, 'L1 table offset'),
    imageSize: u64(b, 48, 'image size'),
    backingOffset: b.readUInt32LE(56),
    backingSize: b.readUInt32LE(60),
  };
}

export function serializeHeader(h: QedHeader): Buffer {
  const b = Buffer.alloc(HEADER_LEN);
  b.writeUInt32LE(MAGIC, 0);
  b.writeUInt32LE(h.clusterSize, 4);
  b.writeUInt32LE(h.tableSize, 8);
  b.writeUInt32LE(h.headerSize, 12);
  b.writeBigUInt64LE(BigInt(h.features), 16);
  b.writeBigUInt64LE(h.compat, 24);
  b.writeBigUInt64LE(h.autoclear, 32);
  b.writeBigUInt64LE(BigInt(h.l1Offset), 40);
  b.writeBigUInt64LE(BigInt(h.imageSize), 48);
  b.writeUInt32LE(h.backingOffset, 56);
  b.writeUInt32LE(h.backingSize, 60);
  return b;
}

const maxImageSize = (cs: number, ts: number): number => {
  const n = (ts * cs) / 8;
  return Math.min(n * n * cs, Number.MAX_SAFE_INTEGER);
};
const imageSizeValid = (size: number, cs: number, ts: number): boolean => size % 512 === 0 && size <= maxImageSize(cs, ts);

interface Lookup { kind: 'data' | 'zero' | 'unalloc'; host: number; l2: number }

export class QedNode implements BlockNode {
  readonly driver = 'qed';
  readonly align = 1;
  mapInvalidator: MapInvalidator | null = null;
  readonly cs: number;
  readonly nelems: number;
  readonly tableBytes: number;
  fileSize: number;
  private cache = new PageCache(CACHE_BYTES);
  private mutex = new Mutex();
  private closed = false;
  private fd: number | null;

  constructor(readonly file: BlockNode, public hdr: QedHeader, public readOnly: boolean, public backing: BlockNode | null,
    readonly backingName: string | null, readonly backingFmt: string | null) {
    this.cs = hdr.clusterSize;
    this.tableBytes = hdr.tableSize * hdr.clusterSize;
    this.nelems = this.tableBytes / 8;
    this.fileSize = Math.floor(file.size / this.cs) * this.cs;
    this.fd = file instanceof FileNode ? file.fd : null;
  }

  get filename(): string { return this.file.filename; }
  get size(): number { return this.hdr.imageSize; }

  validCluster(off: number): boolean {
    return off % this.cs === 0 && off >= this.hdr.headerSize * this.cs && off < this.fileSize;
  }
  validTable(off: number): boolean {
    const end = off + (this.hdr.tableSize - 1) * this.cs;
    return end > off && this.validCluster(off) && this.validCluster(end);
  }

  /** entry `i` of the table at `table` */
  async entry(table: number, i: number): Promise<number> {
    const byte = i * 8;
    const pageLen = Math.min(PAGE, this.tableBytes);
    const pageStart = Math.floor(byte / pageLen) * pageLen;
    const page = await this.cache.load(table + pageStart, pageLen, (b, o) => this.file.read(b, o));
    return u64(page, byte - pageStart, 'table entry');
  }

  async setEntries(table: number, i: number, values: number[]): Promise<void> {
    const b = Buffer.alloc(values.length * 8);
    values.forEach((v, k) => b.writeBigUInt64LE(BigInt(v), k * 8));
    await this.file.write!(b, table + i * 8);
    // then the cached pages (write-through)
    const pageLen = Math.min(PAGE, this.tableBytes);
    for (let k = 0; k < values.length; k++) {
      const byte = (i + k) * 8;
      const pageStart = Math.floor(byte / pageLen) * pageLen;
      this.cache.update(table + pageStart, (page) => page.writeBigUInt64LE(BigInt(values[k]), byte - pageStart));
    }
  }

  async lookup(pos: number): Promise<Lookup> {
    const ci = Math.floor(pos / this.cs);
    const l1i = Math.floor(ci / this.nelems);
    const l2 = await this.entry(this.hdr.l1Offset, l1i);
    if (l2 === 0) return { kind: 'unalloc', host: 0, l2: 0 };
    if (!this.validTable(l2)) throw bad(`L2 table offset 0x${l2.toString(16)} is invalid`);
    const e = await this.entry(l2, ci % this.nelems);
    if (e === 0) return { kind: 'unalloc', host: 0, l2 };
    if (e === ZERO_CLUSTER) return { kind: 'zero', host: 0, l2 };
    if (!this.validCluster(e)) throw bad(`cluster offset 0x${e.toString(16)} is invalid`);
    return { kind: 'data', host: e, l2 };
  }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    const span = this.cs * this.nelems; // guest bytes behind one L1 entry
    // bytes from p to the end of the run its lookup stands for (a missing L2 table covers a whole span)
    const step = (p: number, l: Lookup): number => (l.kind === 'unalloc' && l.l2 === 0 ? span - (p % span) : this.cs - (p % this.cs));
    const first = await this.lookup(offset);
    let len = Math.min(length, step(offset, first));
    for (let n = 0; len < length && n < MAX_STATUS_STEPS; n++) {
      const p = offset + len;
      const l = await this.lookup(p);
      if (l.kind !== first.kind || (l.kind === 'data' && l.host !== first.host + (p - offset) + (offset % this.cs))) break;
      len = Math.min(length, len + step(p, l));
    }
    const state = first.kind === 'data' ? 'data' : first.kind === 'zero' ? 'zero' : 'unallocated';
    const ext: Extent = { offset, length: len, state };
    if (first.kind === 'data' && this.fd !== null) {
      ext.host = { fd: this.fd, offset: first.host + (offset % this.cs), writable: !this.readOnly, direct: (this.file as FileNode).direct };
    }
    return ext;
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const n = Math.min(this.cs - (pos % this.cs), buf.length - done);
      const l = await this.lookup(pos);
      const sub = buf.subarray(done, done + n);
      if (l.kind === 'data') await this.file.read(sub, l.host + (pos % this.cs));
      else if (l.kind === 'zero') sub.fill(0);
      else await readBacking(this.backing, sub, pos);
      done += n;
    }
  }

  async writeHeader(): Promise<void> {
    await this.file.write!(serializeHeader(this.hdr), 0);
  }

  private async markNeedCheck(): Promise<void> {
    if (this.hdr.features & F_NEED_CHECK) return;
    this.hdr.features |= F_NEED_CHECK;
    await this.writeHeader();
    await this.file.flush?.();
  }

  async write(buf: Uint8Array, offset: number, _flags?: WriteFlags): Promise<void> {
    if (this.readOnly) throw new ImgError('readonly', 'qed: the image is opened read-only');
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const busy = this.allocating.get(Math.floor(pos / this.cs));
      if (busy) { await busy; continue; }
      const l = await this.lookup(pos);
      if (l.kind === 'data') {
        const n = Math.min(this.cs - (pos % this.cs), buf.length - done);
        await this.file.write!(buf.subarray(done, done + n), l.host + (pos % this.cs));
        done += n;
        continue;
      }
      // 0: the cluster became data or another request is allocating it: look again
      done += await this.allocWrite(buf.subarray(done), pos);
    }
  }

  // Allocating writes are pipelined, as qemu's: the clusters are reserved at the end of the
  // file under the mutex, the data is written outside it (so the queue's other allocations
  // overlap theirs), and the L2 entries are set under the mutex again, after the data is in
  // place. Until then the clusters are listed here: a request touching one waits for it
  // instead of allocating it a second time.
  private allocating = new Map<number, Promise<void>>();

  /** allocating write of a run of non-data clusters at the start of `buf`; returns bytes consumed */
  private async allocWrite(buf: Uint8Array, pos: number): Promise<number> {
    const cs = this.cs;
    const plan = await this.mutex.run(async () => {
      const start = pos - (pos % cs);
      const kinds: Lookup[] = [];
      let end = start;
      while (end < pos + buf.length && end - start < MAX_BATCH && !this.allocating.has(end / cs)) {
        const l = await this.lookup(end);
        if (l.kind === 'data') break;
        kinds.push(l);
        end += cs;
      }
      if (!kinds.length) return null;
      const consumed = Math.min(end, pos + buf.length) - pos;
      this.mapInvalidator?.(start, end - start);
      await this.markNeedCheck();
      const data = Buffer.alloc(end - start);
      // head and tail come from the backing file unless the cluster is a zero cluster
      const head = pos - start;
      const tailStart = pos + consumed;
      if (head > 0 && kinds[0].kind === 'unalloc') await this.fromBacking(data.subarray(0, head), start);
      if (tailStart < end && kinds[kinds.length - 1].kind === 'unalloc') {
        await this.fromBacking(data.subarray(tailStart - start), tailStart);
      }
      data.set(buf.subarray(0, consumed), head);
      const host = this.fileSize;
      this.fileSize += end - start;
      let release!: () => void;
      const settled = new Promise<void>((r) => { release = r; });
      for (let c = start / cs; c < end / cs; c++) this.allocating.set(c, settled);
      return { start, end, consumed, data, host, release };
    });
    if (!plan) return 0;
    try {
      await this.file.write!(plan.data, plan.host);
      await this.mutex.run(() => this.linkAlloc(plan.start, (plan.end - plan.start) / cs, plan.host));
    } finally {
      for (let c = plan.start / cs; c < plan.end / cs; c++) this.allocating.delete(c);
      plan.release();
    }
    return plan.consumed;
  }

  /** under the mutex: points the L2 entries of n clusters from guest offset start at host */
  private async linkAlloc(start: number, n: number, host: number): Promise<void> {
    const cs = this.cs;
    // L2 updates, grouped per L2 table
    let ci = start / cs;
    let k = 0;
    while (k < n) {
      const l1i = Math.floor(ci / this.nelems);
      const first = ci % this.nelems;
      const cnt = Math.min(n - k, this.nelems - first);
      const vals: number[] = [];
      for (let j = 0; j < cnt; j++) vals.push(host + (k + j) * cs);
      let l2 = await this.entry(this.hdr.l1Offset, l1i);
      if (l2 === 0) {
        l2 = this.fileSize;
        this.fileSize += this.tableBytes;
        const t = Buffer.alloc(this.tableBytes);
        vals.forEach((v, j) => t.writeBigUInt64LE(BigInt(v), (first + j) * 8));
        await this.file.write!(t, l2);
        await this.file.flush?.();
        await this.setEntries(this.hdr.l1Offset, l1i, [l2]);
      } else {
        await this.setEntries(l2, first, vals);
      }
      k += cnt;
      ci += cnt;
    }
  }

  /** waits until no allocating write is in flight */
  private async allocationsDone(): Promise<void> {
    while (this.allocating.size) await Promise.allSettled([...this.allocating.values()]);
  }

  private async fromBacking(b: Buffer, pos: number): Promise<void> {
    const n = Math.max(0, Math.min(b.length, this.size - pos));
    if (n > 0) await readBacking(this.backing, b.subarray(0, n), pos);
  }

  async writeZeroes(offset: number, length: number, _flags?: ZeroFlags): Promise<void> {
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const cEnd = Math.min(end, pos - (pos % this.cs) + this.cs);
      const whole = pos % this.cs === 0 && (cEnd - pos === this.cs || cEnd === this.size);
      const l = await this.lookup(pos);
      if (l.kind === 'zero' || (l.kind === 'unalloc' && !this.backing)) { pos = cEnd; continue; }
      if (!whole || l.kind === 'data') {
        await this.write(Buffer.alloc(cEnd - pos), pos);
      } else {
        await this.mutex.run(async () => {
          const cur = await this.lookup(pos);
          if (cur.kind === 'data') { await this.file.write!(Buffer.alloc(cEnd - pos), cur.host); return; }
          this.mapInvalidator?.(pos, this.cs);
          await this.markNeedCheck();
          const ci = pos / this.cs;
          const l1i = Math.floor(ci / this.nelems);
          let l2 = await this.entry(this.hdr.l1Offset, l1i);
          if (l2 === 0) {
            l2 = this.fileSize;
            this.fileSize += this.tableBytes;
            const t = Buffer.alloc(this.tableBytes);
            t.writeBigUInt64LE(BigInt(ZERO_CLUSTER), (ci % this.nelems) * 8);
            await this.file.write!(t, l2);
            await this.file.flush?.();
            await this.setEntries(this.hdr.l1Offset, l1i, [l2]);
          } else await this.setEntries(l2, ci % this.nelems, [ZERO_CLUSTER]);
        });
      }
      pos = cEnd;
    }
  }

  async flush(): Promise<void> {
    if (this.readOnly) return;
    await this.mutex.run(async () => {
      await this.file.flush?.();
      // with allocations still in flight the bit stays (the next flush clears it)
      if (this.hdr.features & F_NEED_CHECK && this.allocating.size === 0) {
        this.hdr.features &= ~F_NEED_CHECK;
        await this.writeHeader();
        await this.file.flush?.();
      }
    });
  }

  /** after commit: every cluster unallocated again, the file cut back to header and L1 table */
  async makeEmpty(): Promise<void> {
    if (this.readOnly) throw new ImgError('readonly', 'qed: the image is opened read-only');
    await this.allocationsDone();
    await this.mutex.run(async () => {
      this.mapInvalidator?.(0, this.size);
      await this.file.write!(Buffer.alloc(this.tableBytes), this.hdr.l1Offset);
      this.cache.clear();
      const end = Math.max(this.hdr.l1Offset + this.tableBytes, this.hdr.headerSize * this.cs);
      if (this.file.truncate && this.file.size > end) await this.file.truncate(end);
      this.fileSize = Math.floor(this.file.size / this.cs) * this.cs;
      await this.file.flush?.();
    });
  }

  async truncate(size: number, prealloc?: Preallocation): Promise<void> {
    if (prealloc && prealloc !== 'off') throw new ImgError('unsupported', 'qed: preallocation is not supported on resize');
    if (size < this.size) throw new ImgError('unsupported', 'qed: cannot shrink images');
    if (!imageSizeValid(size, this.cs, this.hdr.tableSize)) throw new ImgError('usage', 'qed: invalid image size specified');
    await this.mutex.run(async () => {
      this.hdr.imageSize = size;
      await this.writeHeader();
      await this.file.flush?.();
    });
  }

  async allocatedSize(): Promise<number> {
    return this.file.allocatedSize ? this.file.allocatedSize() : this.file.size;
  }

  async infoExtra(): Promise<Record<string, unknown>> {
    const r: Record<string, unknown> = { 'cluster-size': this.cs };
    if (this.backingName !== null) {
      r['backing-filename'] = this.backingName;
      r['full-backing-filename'] = fullBackingName(this.backingName, this.file.filename);
      if (this.backingFmt) r['backing-filename-format'] = this.backingFmt;
    }
    r['dirty-flag'] = false;
    return r;
  }

  async setBacking(filename: string | null, format: string | null): Promise<void> {
    const name = filename ?? '';
    const nb = Buffer.from(name, 'utf8');
    if (HEADER_LEN + nb.length > this.hdr.headerSize * this.cs) throw new ImgError('usage', 'qed: backing file name too long');
    await this.mutex.run(async () => {
      if (filename) {
        this.hdr.features |= F_BACKING_FILE;
        this.hdr.backingOffset = HEADER_LEN;
        this.hdr.backingSize = nb.length;
        if (format === 'raw') this.hdr.features |= F_NO_PROBE; else this.hdr.features &= ~F_NO_PROBE;
        await this.file.write!(nb, HEADER_LEN);
      } else {
        this.hdr.features &= ~(F_BACKING_FILE | F_NO_PROBE);
        this.hdr.backingOffset = 0;
        this.hdr.backingSize = 0;
      }
      await this.writeHeader();
      await this.file.flush?.();
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.allocationsDone();
      if (!this.readOnly) await this.flush();
    } finally {
      this.cache.clear();
      await this.backing?.close().catch(() => undefined);
      await this.file.close();
    }
  }

  // ------------------------------------------------------------------ check
  /** calls fn(index, value) for every non-zero entry of a table, reading it 1 MiB at a time */
  private async scanTable(table: number, fn: (i: number, v: bigint) => void): Promise<void> {
    const chunk = Math.min(this.tableBytes, 1 << 20);
    const b = Buffer.alloc(chunk);
    for (let off = 0; off < this.tableBytes; off += chunk) {
      await this.file.read(b, table + off);
      for (let k = 0; k < chunk; k += 8) {
        const v = b.readBigUInt64LE(k);
        if (v !== 0n) fn((off + k) / 8, v);
      }
    }
  }

  async check(fix: boolean): Promise<CheckResult> {
    const res: CheckResult = { checkErrors: 0, corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, messages: [] };
    const cs = this.cs;
    const ncl = Math.ceil(this.fileSize / cs);
    if (ncl > 2 ** 30) throw bad(`the file has too many clusters (${ncl}) to check`);
    const used = new Uint8Array(Math.ceil(ncl / 8) + 1);
    const mark = (off: number, n: number): boolean => {
      let c = Math.floor(off / cs);
      let dup = 0;
      for (let i = 0; i < n; i++, c++) {
        if (used[c >> 3] & (1 << (c & 7))) dup++;
        used[c >> 3] |= 1 << (c & 7);
      }
      res.corruptions += dup;
      return dup === 0;
    };
    const big = BigInt(Number.MAX_SAFE_INTEGER);
    res.totalClusters = Math.ceil(this.size / cs);
    let allocated = 0;
    let fragmented = 0;
    mark(this.hdr.l1Offset, this.hdr.tableSize);
    const l2s: Array<[number, number]> = [];
    const badL1: number[] = [];
    await this.scanTable(this.hdr.l1Offset, (i, v) => {
      const l2 = v > big ? -1 : Number(v);
      if (l2 < 0 || !this.validTable(l2)) {
        res.messages.push(`ERROR: invalid L2 table offset 0x${v.toString(16)} in L1 entry ${i}`);
        res.corruptions++;
        badL1.push(i);
      } else l2s.push([i, l2]);
    });
    for (const [, l2] of l2s) {
      if (!mark(l2, this.hdr.tableSize)) continue;
      const badL2: number[] = [];
      let last = 0; // as qemu: fragmentation is counted within each L2 table, valid or not
      await this.scanTable(l2, (j, v) => {
        if (v === BigInt(ZERO_CLUSTER)) return;
        const e = v > big ? -1 : Number(v);
        allocated++;
        if (last && last + cs !== e) fragmented++;
        last = e;
        if (e < 0 || !this.validCluster(e)) {
          res.messages.push(`ERROR: invalid cluster offset 0x${v.toString(16)} in L2 table 0x${l2.toString(16)} entry ${j}`);
          res.corruptions++;
          badL2.push(j);
          return;
        }
        mark(e, 1);
      });
      if (fix) for (const j of badL2) { await this.setEntries(l2, j, [0]); res.corruptionsFixed++; }
    }
    if (fix) for (const i of badL1) { await this.setEntries(this.hdr.l1Offset, i, [0]); res.corruptionsFixed++; }
    for (let c = this.hdr.headerSize; c < ncl; c++) if (!(used[c >> 3] & (1 << (c & 7)))) res.leaks++;
    res.allocatedClusters = allocated;
    if (fragmented) res.fragmentedClusters = fragmented;
    if (fix && res.corruptions === res.corruptionsFixed && !res.checkErrors && (this.hdr.features & F_NEED_CHECK)) {
      this.hdr.features &= ~F_NEED_CHECK;
      await this.writeHeader();
      await this.file.flush?.();
    }
    return res;
  }
}

async function openQed(file: BlockNode, ctx: OpenContext, forCheck: boolean): Promise<QedNode> {
  const r = new OptionReader(ctx.options, 'qed');
  r.finish();
  if (file.size < HEADER_LEN) throw new ImgError('image', 'Image not in QED format');
  const hb = Buffer.alloc(HEADER_LEN);
  await file.read(hb, 0);
  const h = parseHeader(hb);
  const cs = h.clusterSize;
  if (!pow2(cs) || cs < MIN_CS || cs > MAX_CS) throw bad(`invalid cluster size ${cs}`);
  if (!pow2(h.tableSize) || h.tableSize > MAX_TS) throw bad(`invalid table size ${h.tableSize}`);
  if (h.headerSize === 0 || h.headerSize * cs > INT_MAX) throw bad(`invalid header size ${h.headerSize}`);
  if (!imageSizeValid(h.imageSize, cs, h.tableSize)) throw bad(`invalid image size ${h.imageSize}`);
  let backingName: string | null = null;
  let backingFmt: string | null = null;
  if (h.features & F_BACKING_FILE) {
    if (h.backingOffset + h.backingSize > h.headerSize * cs || h.backingSize >= 4096 || h.backingOffset + h.backingSize > file.size) {
      throw bad('backing file name lies outside the header');
    }
    const nb = Buffer.alloc(h.backingSize);
    await file.read(nb, h.backingOffset);
    backingName = nb.toString('utf8');
    if (h.features & F_NO_PROBE) backingFmt = 'raw';
  }
  const readOnly = ctx.readOnly;
  const tmp = new QedNode(file, h, readOnly, null, backingName, backingFmt);
  if (!tmp.validTable(h.l1Offset)) throw new ImgError('image', 'QED table offset is invalid');
  let backing: BlockNode | null = null;
  try {
    backing = await ctx.openBacking(backingName, backingFmt);
    const node = new QedNode(file, h, readOnly, backing, backingName, backingFmt);
    if (!readOnly && !forCheck) {
      if (h.autoclear) { h.autoclear = 0n; await node.writeHeader(); }
      if (h.features & F_NEED_CHECK) {
        const res = await node.check(true);
        if (res.corruptions - res.corruptionsFixed > 0 || res.checkErrors) throw bad('image is corrupt; the consistency check could not repair it');
      }
    }
    return node;
  } catch (e) {
    await backing?.close().catch(() => undefined);
    throw e;
  }
}

async function createQed(ctx: CreateContext): Promise<void> {
  const r = new OptionReader(ctx.options, 'qed');
  r.markUsed('size');
  const backingFile = r.str('backing_file') ?? null;
  const backingFmt = r.str('backing_fmt') ?? null;
  const cs = r.int('cluster_size', 65536);
  const ts = r.int('table_size', 4);
  const prealloc = r.choice('preallocation', ['off', 'falloc', 'full'] as const, 'off');
  r.bool('nocow', false);
  r.int('extent_size_hint', 0);
  r.finish();
  if (!pow2(cs) || cs < MIN_CS || cs > MAX_CS) throw new ImgError('usage', `QED cluster size must be within range [${MIN_CS}, ${MAX_CS}] and power of 2`);
  if (!pow2(ts) || ts > MAX_TS) throw new ImgError('usage', `QED table size must be within range [1, ${MAX_TS}] and power of 2`);
  let size = ctx.size;
  if (size === null && backingFile) {
    const b = await ctx.open(backingFile, backingFmt ?? undefined);
    size = b.size;
  }
  if (size === null) throw new ImgError('usage', 'qed: image size required');
  size = Math.ceil(size / 512) * 512;
  if (!imageSizeValid(size, cs, ts)) {
    throw new ImgError('usage', `QED image size must be a non-zero multiple of cluster size and less than ${maxImageSize(cs, ts)} bytes`);
  }
  const nb = backingFile ? Buffer.from(backingFile, 'utf8') : null;
  if (nb && HEADER_LEN + nb.length > cs) throw new ImgError('usage', 'qed: backing file name too long');
  const h: QedHeader = {
    clusterSize: cs, tableSize: ts, headerSize: 1, features: 0, compat: 0n, autoclear: 0n, l1Offset: cs, imageSize: size,
    backingOffset: 0, backingSize: 0,
  };
  if (nb) {
    h.features |= F_BACKING_FILE;
    h.backingOffset = HEADER_LEN;
    h.backingSize = nb.length;
    if (backingFmt === 'raw') h.features |= F_NO_PROBE;
  }
  await createFile(ctx.filename, 0, prealloc);
  await withFileRw(ctx.filename, async (f) => {
    await f.write(serializeHeader(h), 0);
    if (nb) await f.write(nb, HEADER_LEN);
    await f.truncate(cs + cs * ts);
  });
}

export const qedDriver: FormatDriver = {
  name: 'qed',
  probe(head: Uint8Array): number {
    if (head.length < HEADER_LEN) return 0;
    return Buffer.from(head.buffer, head.byteOffset, head.length).readUInt32LE(0) === MAGIC ? 100 : 0;
  },
  createOptions: ['size', 'backing_file', 'backing_fmt', 'cluster_size', 'table_size', 'preallocation', 'nocow', 'extent_size_hint'],
  open: (file, ctx) => openQed(file, ctx, false),
  create: createQed,
  async check(file, ctx, repair) {
    const node = await openQed(file, { ...ctx, openBacking: async () => null }, true);
    return node.check(repair !== 'none');
  },
};
