// Parallels expandable images (docs/interop/parallels.txt): header, BAT, data area.
// "WithouFreSpacExt" images are read and written; the older "WithoutFreeSpace" variant (BAT
// entries in sectors) is read-only. Check and repair as qemu-img check.
import { ImgError } from '../../core/errors';
import { readBacking } from '../../core/io';
import type {
  BlockNode, CheckResult, CreateContext, Extent, FormatDriver, MapInvalidator, OpenContext, Preallocation, WriteFlags,
} from '../../core/node';
import { OptionReader } from '../../core/options';
import { createFile, FileNode, withFileRw } from '../../protocols/file';
import { Mutex } from '../qcow2/util';

const MAGIC_OLD = 'WithoutFreeSpace';
const MAGIC_EXT = 'WithouFreSpacExt';
const HEADER_LEN = 64;
const VERSION = 2;
const INUSE_MAGIC = 0x746f6e59;
const SECTOR = 512;
const INT32_MAX = 0x7fffffff;
/** our bound on the BAT kept in memory (16 MiB: 4 TiB of disk with 1 MiB clusters) */
const MAX_BAT_BYTES = 16 << 20;
const DEFAULT_CLUSTER = 1 << 20;

const bad = (msg: string): ImgError => new ImgError('image', `parallels: ${msg}`);

export interface ParallelsHeader {
  raw: Buffer;
  ext: boolean;
  tracks: number;
  batEntries: number;
  nbSectors: number;
  inuse: number;
  dataOff: number;
  flags: number;
  extOff: number;
}

function parseHeader(b: Buffer): ParallelsHeader {
  const magic = b.subarray(0, 16).toString('latin1');
  if (magic !== MAGIC_OLD && magic !== MAGIC_EXT) throw new ImgError('image', 'Image not in Parallels format');
  if (b.readUInt32LE(16) !== VERSION) throw new ImgError('image', 'Image not in Parallels format (unsupported version)');
  const ext = magic === MAGIC_EXT;
  const nb = b.readBigUInt64LE(36);
  const extOff = b.readBigUInt64LE(56);
  if (nb > BigInt(Math.floor(Number.MAX_SAFE_INTEGER / SECTOR))) throw bad('disk size is out of range');
  if (extOff > BigInt(Math.floor(Number.MAX_SAFE_INTEGER / SECTOR))) throw bad('format extension offset is out of range');
  return {
    raw: b,
    ext,
    tracks: b.readUInt32LE(28),
    batEntries: b.readUInt32LE(32),
    nbSectors: ext ? Number(nb) : Number(nb & 0xffffffffn),
    inuse: b.readUInt32LE(44),
    dataOff: b.readUInt32LE(48),
    flags: b.readUInt32LE(52),
    extOff: Number(extOff),
  };
}

export class ParallelsNode implements BlockNode {
  readonly driver = 'parallels';
  readonly align = 1;
  mapInvalidator: MapInvalidator | null = null;
  readonly cs: number;
  readonly size: number;
  readonly mult: number;
  readonly dataStart: number; // bytes
  dataEnd: number; // bytes: where the next cluster goes
  private mutex = new Mutex();
  private closed = false;
  private fd: number | null;
  headerUnclean: boolean;

  constructor(readonly file: BlockNode, readonly hdr: ParallelsHeader, readonly bat: Buffer, readonly readOnly: boolean,
    readonly backing: BlockNode | null) {
    this.cs = hdr.tracks * SECTOR;
    this.size = hdr.nbSectors * SECTOR;
    this.mult = hdr.ext ? hdr.tracks : 1;
    this.dataStart = (hdr.dataOff || Math.ceil((HEADER_LEN + hdr.batEntries * 4) / SECTOR)) * SECTOR;
    this.headerUnclean = hdr.inuse === INUSE_MAGIC;
    this.fd = file instanceof FileNode ? file.fd : null;
    let end = this.dataStart;
    for (let i = 0; i < hdr.batEntries; i++) {
      const e = bat.readUInt32LE(i * 4);
      if (e) end = Math.max(end, e * this.mult * SECTOR + this.cs);
    }
    if (hdr.extOff) end = Math.max(end, hdr.extOff * SECTOR + this.cs);
    this.dataEnd = end;
  }

  get filename(): string { return this.file.filename; }

  /** host byte offset of guest cluster `i`, 0 when unallocated */
  private hostOf(i: number): number {
    if (i >= this.hdr.batEntries) return 0;
    const e = this.bat.readUInt32LE(i * 4);
    if (!e) return 0;
    const off = e * this.mult * SECTOR;
    if (off < this.dataStart || off >= this.file.size) throw bad(`cluster ${i} at offset ${off} lies outside the data area`);
    return off;
  }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    const ci = Math.floor(offset / this.cs);
    const inC = offset % this.cs;
    const h = this.hostOf(ci);
    let len = Math.min(length, this.cs - inC);
    for (let j = ci + 1; len < length; j++) {
      const n = this.hostOf(j);
      if ((n === 0) !== (h === 0) || (h && n !== h + (j - ci) * this.cs)) break;
      len = Math.min(length, len + this.cs);
    }
    if (!h) return { offset, length: len, state: 'unallocated' };
    const ext: Extent = { offset, length: len, state: 'data' };
    if (this.fd !== null) ext.host = { fd: this.fd, offset: h + inC, writable: !this.readOnly, direct: (this.file as FileNode).direct };
    return ext;
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const inC = pos % this.cs;
      const n = Math.min(this.cs - inC, buf.length - done);
      const h = this.hostOf(Math.floor(pos / this.cs));
      const sub = buf.subarray(done, done + n);
      if (h) await this.file.read(sub, h + inC);
      else await readBacking(this.backing, sub, pos);
      done += n;
    }
  }

  async write(buf: Uint8Array, offset: number, _flags?: WriteFlags): Promise<void> {
    if (this.readOnly) throw new ImgError('readonly', 'parallels: the image is opened read-only');
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const inC = pos % this.cs;
      const n = Math.min(this.cs - inC, buf.length - done);
      const ci = Math.floor(pos / this.cs);
      const chunk = buf.subarray(done, done + n);
      const h = this.hostOf(ci);
      if (h) await this.file.write!(chunk, h + inC);
      else await this.mutex.run(() => this.allocate(ci, chunk, inC));
      done += n;
    }
  }

  private async allocate(ci: number, chunk: Uint8Array, inC: number): Promise<void> {
    const cur = this.hostOf(ci);
    if (cur) { await this.file.write!(chunk, cur + inC); return; }
    if (ci >= this.hdr.batEntries) throw bad(`cluster ${ci} is beyond the BAT (${this.hdr.batEntries} entries)`);
    const units = this.mult * SECTOR;
    const host = Math.ceil(this.dataEnd / units) * units;
    const entry = host / units;
    if (entry > 0xffffffff) throw new ImgError('nospace', 'parallels: the image file is full (BAT offsets exhausted)');
    this.mapInvalidator?.(ci * this.cs, this.cs);
    const data = Buffer.alloc(this.cs);
    const cStart = ci * this.cs;
    if (this.backing) {
      const n = Math.max(0, Math.min(this.cs, this.size - cStart));
      if (n) await readBacking(this.backing, data.subarray(0, n), cStart);
    }
    data.set(chunk, inC);
    await this.file.write!(data, host);
    this.dataEnd = host + this.cs;
    this.bat.writeUInt32LE(entry, ci * 4);
    await this.file.write!(this.bat.subarray(ci * 4, ci * 4 + 4), HEADER_LEN + ci * 4);
  }

  async writeInuse(v: number): Promise<void> {
    this.hdr.raw.writeUInt32LE(v, 44);
    this.hdr.inuse = v;
    await this.file.write!(this.hdr.raw, 0);
    await this.file.flush?.();
  }

  async flush(): Promise<void> { if (!this.readOnly) await this.file.flush?.(); }

  async truncate(_size: number, _prealloc?: Preallocation): Promise<void> {
    throw new ImgError('unsupported', 'parallels: resizing is not supported');
  }

  async allocatedSize(): Promise<number> {
    return this.file.allocatedSize ? this.file.allocatedSize() : this.file.size;
  }

  /** qemu 7.2/8.2 print neither cluster-size nor dirty-flag for parallels (no get_info) */
  async infoExtra(): Promise<Record<string, unknown>> { return { 'dirty-flag': null }; }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      if (!this.readOnly) {
        await this.mutex.run(async () => {
          await this.file.flush?.();
          if (this.file.truncate && this.file.size > this.dataEnd) await this.file.truncate(this.dataEnd);
          await this.writeInuse(0);
        });
      }
    } finally {
      await this.backing?.close().catch(() => undefined);
      await this.file.close();
    }
  }

  async check(fixErrors: boolean, fixLeaks: boolean): Promise<CheckResult> {
    const res: CheckResult = { checkErrors: 0, corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, messages: [] };
    const size = this.file.size;
    if (this.headerUnclean) {
      res.messages.push(`${fixErrors ? 'Repairing' : 'ERROR'} image was not closed correctly`);
      res.corruptions++;
      if (fixErrors) { res.corruptionsFixed++; this.headerUnclean = false; }
    }
    res.totalClusters = this.hdr.batEntries;
    let allocated = 0, fragmented = 0;
    let high = 0, prev = 0;
    // duplicates: entries sorted by value, equal neighbours share a cluster
    const vals = new Uint32Array(this.hdr.batEntries);
    for (let i = 0; i < vals.length; i++) vals[i] = this.bat.readUInt32LE(i * 4);
    const sorted = vals.slice().sort();
    const dup = new Set<number>();
    for (let k = 1; k < sorted.length; k++) if (sorted[k] && sorted[k] === sorted[k - 1]) dup.add(sorted[k]);
    const firstUser = new Map<number, number>();
    const units = this.mult * SECTOR;
    for (let i = 0; i < this.hdr.batEntries; i++) {
      let off = this.bat.readUInt32LE(i * 4) * units;
      if (!off) { prev = 0; continue; }
      if (off + this.cs > size || off < this.dataStart || (off - this.dataStart) % SECTOR) {
        res.messages.push(`${fixErrors ? 'Repairing' : 'ERROR'} cluster ${i} is outside image`);
        res.corruptions++;
        if (fixErrors) {
          this.bat.writeUInt32LE(0, i * 4);
          await this.file.write!(this.bat.subarray(i * 4, i * 4 + 4), HEADER_LEN + i * 4);
          res.corruptionsFixed++;
        }
        prev = 0;
        continue;
      }
      const raw = this.bat.readUInt32LE(i * 4);
      if (dup.has(raw) && !firstUser.has(raw)) firstUser.set(raw, i);
      else if (dup.has(raw)) {
        res.messages.push(`${fixErrors ? 'Repairing' : 'ERROR'} BAT offset in entry ${i} duplicates entry ${firstUser.get(raw)}`);
        res.corruptions++;
        if (fixErrors) {
          // give the second user its own copy of the cluster
          const data = Buffer.alloc(this.cs);
          await this.file.read(data, off);
          const host = Math.ceil(Math.max(this.dataEnd, size) / units) * units;
          await this.file.write!(data, host);
          this.dataEnd = host + this.cs;
          this.bat.writeUInt32LE(host / units, i * 4);
          await this.file.write!(this.bat.subarray(i * 4, i * 4 + 4), HEADER_LEN + i * 4);
          off = host;
          res.corruptionsFixed++;
        }
      }
      allocated++;
      high = Math.max(high, off);
      if (prev && prev + this.cs !== off) fragmented++;
      prev = off;
    }
    if (this.hdr.extOff) high = Math.max(high, this.hdr.extOff * SECTOR);
    res.allocatedClusters = allocated;
    res.fragmentedClusters = fragmented;
    const endOff = high ? high + this.cs : this.dataStart;
    res.imageEndOffset = endOff;
    const curSize = this.file.size;
    if (curSize > endOff) {
      const count = Math.ceil((curSize - endOff) / this.cs);
      res.messages.push(`${fixLeaks ? 'Repairing' : 'ERROR'} space leaked at the end of the image ${curSize - endOff}`);
      res.leaks += count;
      if (fixLeaks && this.file.truncate) { await this.file.truncate(endOff); res.leaksFixed += count; }
    }
    this.dataEnd = Math.max(endOff, this.dataStart);
    if ((fixErrors || fixLeaks) && !this.readOnly) {
      if (fixErrors && this.hdr.inuse === INUSE_MAGIC) await this.writeInuse(0);
      await this.file.flush?.();
    }
    return res;
  }
}

async function openParallels(file: BlockNode, ctx: OpenContext, forCheck: boolean): Promise<ParallelsNode> {
  const r = new OptionReader(ctx.options, 'parallels');
  for (const k of ['prealloc-mode', 'prealloc-size']) r.markUsed(k);
  r.finish();
  if (file.size < HEADER_LEN) throw new ImgError('image', 'Image not in Parallels format');
  const hb = Buffer.alloc(HEADER_LEN);
  await file.read(hb, 0);
  const h = parseHeader(hb);
  if (h.tracks === 0) throw bad('Invalid image: Zero sectors per track');
  if (h.tracks > Math.floor(INT32_MAX / 513)) throw bad('Invalid image: Too big cluster');
  if (h.batEntries > Math.floor(INT32_MAX / 4)) throw bad('Catalog too large');
  const batBytes = h.batEntries * 4;
  if (batBytes > MAX_BAT_BYTES) throw bad(`BAT of ${h.batEntries} entries is larger than supported`);
  if (HEADER_LEN + batBytes > file.size) throw bad('BAT lies past the end of the file');
  if (h.dataOff && h.dataOff * SECTOR < HEADER_LEN + batBytes) throw bad('data area overlaps the BAT');
  if (h.extOff && h.extOff * SECTOR >= file.size) throw bad('format extension lies past the end of the file');
  const bat = Buffer.alloc(batBytes);
  await file.read(bat, HEADER_LEN);
  // the old variant is read-only here
  const readOnly = ctx.readOnly || !h.ext;
  const backing = await ctx.openBacking(null, null);
  try {
    const node = new ParallelsNode(file, h, bat, readOnly, backing);
    if (!readOnly && !forCheck) {
      if (node.headerUnclean) {
        const res = await node.check(true, true);
        if (res.corruptions - res.corruptionsFixed > 0) throw bad('image was not closed correctly and could not be repaired');
      }
      await node.writeInuse(INUSE_MAGIC);
    }
    return node;
  } catch (e) {
    await backing?.close().catch(() => undefined);
    throw e;
  }
}

async function createParallels(ctx: CreateContext): Promise<void> {
  const r = new OptionReader(ctx.options, 'parallels');
  r.markUsed('size');
  const clOpt = r.int('cluster_size', DEFAULT_CLUSTER, 1);
  const prealloc = r.choice('preallocation', ['off', 'falloc', 'full'] as const, 'off');
  r.bool('nocow', false);
  r.int('extent_size_hint', 0);
  r.finish();
  if (ctx.size === null) throw new ImgError('usage', 'parallels: image size required');
  const cl = Math.ceil(clOpt / SECTOR) * SECTOR;
  const tracks = cl / SECTOR;
  if (tracks > Math.floor(INT32_MAX / 513)) throw new ImgError('usage', 'parallels: cluster size is too large');
  const total = Math.ceil(ctx.size / SECTOR) * SECTOR;
  if (total >= 2 ** 32 * cl) throw new ImgError('usage', 'Image size is too large for this cluster size');
  const sectors = total / SECTOR;
  const bat = Math.ceil(sectors / tracks);
  if (bat * 4 > MAX_BAT_BYTES) throw new ImgError('usage', 'parallels: image too large for this cluster size');
  const dataOff = Math.ceil((HEADER_LEN + bat * 4) / cl) * cl;
  const h = Buffer.alloc(HEADER_LEN);
  h.write(MAGIC_EXT, 0, 'latin1');
  h.writeUInt32LE(VERSION, 16);
  h.writeUInt32LE(16, 20);
  h.writeUInt32LE(Math.floor(sectors / 16 / 32), 24);
  h.writeUInt32LE(tracks, 28);
  h.writeUInt32LE(bat, 32);
  h.writeBigUInt64LE(BigInt(sectors), 36);
  h.writeUInt32LE(dataOff / SECTOR, 48);
  await createFile(ctx.filename, 0, 'off');
  await withFileRw(ctx.filename, async (f) => {
    await f.write(h, 0);
    await f.truncate(dataOff, prealloc);
  });
}

export const parallelsDriver: FormatDriver = {
  name: 'parallels',
  probe(head: Uint8Array): number {
    if (head.length < HEADER_LEN) return 0;
    const b = Buffer.from(head.buffer, head.byteOffset, head.length);
    const m = b.subarray(0, 16).toString('latin1');
    return (m === MAGIC_OLD || m === MAGIC_EXT) && b.readUInt32LE(16) === VERSION ? 100 : 0;
  },
  createOptions: ['size', 'cluster_size', 'preallocation', 'nocow', 'extent_size_hint'],
  open: (file, ctx) => openParallels(file, ctx, false),
  create: createParallels,
  async check(file, ctx, repair) {
    const node = await openParallels(file, { ...ctx, readOnly: repair === 'none', openBacking: async () => null }, true);
    if (repair !== 'none' && node.readOnly) throw new ImgError('unsupported', 'parallels: the WithoutFreeSpace variant is read-only here');
    return node.check(repair === 'all', repair !== 'none');
  },
};
