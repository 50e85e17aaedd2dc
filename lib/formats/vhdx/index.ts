// vhdx: Microsoft Hyper-V VHDX images (dynamic and fixed), with qemu's block/vhdx*.c behaviour:
// both headers (sequence numbers, CRC-32C), region table, metadata items, BAT with payload and
// sector-bitmap entries, and the metadata log (replayed on open; BAT updates go through it).
import { ImgError } from '../../core/errors';
import type { BlockNode, CheckResult, CreateContext, Extent, FormatDriver, OpenContext, WriteFlags } from '../../core/node';
import { OptionReader } from '../../core/options';
import { createFile, FileNode, withFileRw } from '../../protocols/file';
import {
  BAT_GUID, checksum, FILE_PARAMS_GUID, guidText, Header, HEADER1, HEADER2, HEADER_SIZE, isZeroGuid, LOG_SECTOR, LSS_GUID,
  MAX_BLOCK_SIZE, MAX_IMAGE_SIZE, MAX_METADATA_ENTRIES, MAX_REGION_ENTRIES, MAX_SECTORS_PER_BLOCK, METADATA_GUID,
  METADATA_TABLE_SIZE, MiB, newGuid, PAGE83_GUID, PARENT_LOCATOR_GUID, parseHeader, PAYLOAD_FULLY_PRESENT,
  PAYLOAD_NOT_PRESENT, PAYLOAD_PARTIALLY_PRESENT, PAYLOAD_UNDEFINED, PAYLOAD_UNMAPPED, PAYLOAD_UNMAPPED_V095,
  PAYLOAD_ZERO, PSS_GUID, REGION1, REGION_SIZE, SB_BLOCK_PRESENT, serializeHeader, VDISK_SIZE_GUID, VHDX_PARENT_LOCATOR_TYPE,
} from './format';
import { buildEntry, Overlay, replayToFile, searchLog } from './log';
import { Mutex } from '../../core/mutex';

/** the in-memory BAT is bounded: 16 Mi entries (128 MiB) */
const MAX_BAT_BYTES = 128 * MiB;


interface Reader { size: number; read(buf: Uint8Array, offset: number): Promise<void> }

export interface VhdxLayout {
  header: Header;
  slot: 0 | 1;
  batOffset: number;
  batLength: number;
  metaOffset: number;
  metaLength: number;
  blockSize: number;
  leaveAllocated: boolean;
  hasParent: boolean;
  /** parent locator key/value pairs of a differencing image */
  parent: Map<string, string> | null;
  size: number;
  lss: number;
  pss: number;
  page83: Buffer;
  chunkRatio: number;
  dataBlocks: number;
  batEntries: number;
  bat: Buffer;
  logReplayed: boolean;
  overlay: Overlay | null;
}

const bad = (m: string): ImgError => new ImgError('image', `vhdx: ${m}`);

/** the parent locator item: type GUID, key/value count, then UTF-16LE keys and values */
export function parseParentLocator(v: Buffer): Map<string, string> {
  if (!v.subarray(0, 16).equals(VHDX_PARENT_LOCATOR_TYPE)) throw new ImgError('unsupported', `vhdx: unknown parent locator type ${guidText(v)}`);
  const n = v.readUInt16LE(18);
  if (20 + n * 12 > v.length) throw bad('parent locator entries out of bounds');
  const m = new Map<string, string>();
  for (let i = 0; i < n; i++) {
    const e = 20 + i * 12;
    const ko = v.readUInt32LE(e); const vo = v.readUInt32LE(e + 4); const kl = v.readUInt16LE(e + 8); const vl = v.readUInt16LE(e + 10);
    if (ko + kl > v.length || vo + vl > v.length || kl % 2 || vl % 2) throw bad('parent locator string out of bounds');
    m.set(v.toString('utf16le', ko, ko + kl), v.toString('utf16le', vo, vo + vl));
  }
  if (!m.has('parent_linkage')) throw bad('parent locator without parent_linkage');
  return m;
}

const braced = (g: Buffer): string => `{${guidText(g)}}`.toLowerCase();

async function readHeaders(file: BlockNode): Promise<{ header: Header; slot: 0 | 1 }> {
  if (file.size < 1 * MiB) throw bad('file too small to be a VHDX image');
  const id = Buffer.alloc(8);
  await file.read(id, 0);
  if (id.toString('latin1') !== 'vhdxfile') throw bad('invalid file signature (no vhdxfile)');
  const b1 = Buffer.alloc(HEADER_SIZE); const b2 = Buffer.alloc(HEADER_SIZE);
  await file.read(b1, HEADER1);
  await file.read(b2, HEADER2);
  const h1 = parseHeader(b1); const h2 = parseHeader(b2);
  let header: Header; let slot: 0 | 1;
  if (h1 && !h2) { header = h1; slot = 0; } else if (!h1 && h2) { header = h2; slot = 1; } else if (!h1 || !h2) {
    throw bad('no valid header (bad signature or checksum in both)');
  } else if (h1.seq > h2.seq) { header = h1; slot = 0; } else if (h2.seq > h1.seq) { header = h2; slot = 1; } else if (b1.equals(b2)) {
    header = h1; slot = 0; // disk2vhd writes two identical headers
  } else throw bad('both headers have the same sequence number but differ');
  if (header.version !== 1) throw new ImgError('unsupported', `vhdx: unsupported header version ${header.version}`);
  if (header.logVersion !== 0) throw new ImgError('unsupported', `vhdx: unsupported log version ${header.logVersion}`);
  if (header.logOffset < MiB || header.logOffset % MiB !== 0) throw bad(`invalid log offset ${header.logOffset}`);
  if (header.logLength % MiB !== 0) throw bad(`invalid log length ${header.logLength}`);
  if (header.logOffset + header.logLength > file.size) throw bad('the log is beyond the end of the file');
  return { header, slot };
}

async function parseLayout(file: BlockNode, src: Reader, header: Header, slot: 0 | 1): Promise<Omit<VhdxLayout, 'logReplayed' | 'overlay'>> {
  const rt = Buffer.alloc(REGION_SIZE);
  await src.read(rt, REGION1);
  if (rt.toString('latin1', 0, 4) !== 'regi') throw bad('invalid region table signature');
  if (checksum(rt) !== rt.readUInt32LE(4)) throw bad('region table checksum mismatch');
  const count = rt.readUInt32LE(8);
  if (count > MAX_REGION_ENTRIES) throw bad(`too many region table entries (${count})`);
  let bat: [number, number] | null = null; let meta: [number, number] | null = null;
  const spans: [number, number][] = [[0, MiB], [header.logOffset, header.logLength]];
  for (let i = 0; i < count; i++) {
    const e = rt.subarray(16 + 32 * i, 48 + 32 * i);
    const off = e.readBigUInt64LE(16); const len = e.readUInt32LE(24); const required = e.readUInt32LE(28) & 1;
    if (off % BigInt(MiB) !== 0n || len % MiB !== 0 || off > BigInt(src.size) || Number(off) + len > src.size || Number(off) < MiB) {
      throw bad(`region ${guidText(e)} at ${off} (+${len}) is invalid or beyond the end of the file`);
    }
    const o = Number(off);
    for (const [s, l] of spans) if (o < s + l && s < o + len) throw bad(`region ${guidText(e)} overlaps another region`);
    spans.push([o, len]);
    if (e.subarray(0, 16).equals(BAT_GUID)) {
      if (bat) throw bad('duplicate BAT region'); bat = [o, len];
    } else if (e.subarray(0, 16).equals(METADATA_GUID)) {
      if (meta) throw bad('duplicate metadata region'); meta = [o, len];
    } else if (required) throw new ImgError('unsupported', `vhdx: unknown required region ${guidText(e)}`);
  }
  if (!bat || !meta) throw bad('missing BAT or metadata region');
  if (meta[1] < METADATA_TABLE_SIZE) throw bad('metadata region too small');
  const mt = Buffer.alloc(METADATA_TABLE_SIZE);
  await src.read(mt, meta[0]);
  if (mt.toString('latin1', 0, 8) !== 'metadata') throw bad('invalid metadata table signature');
  const mcount = mt.readUInt16LE(10);
  if (mcount > MAX_METADATA_ENTRIES) throw bad(`too many metadata entries (${mcount})`);
  const items = new Map<string, Buffer>();
  for (let i = 0; i < mcount; i++) {
    const e = mt.subarray(32 + 32 * i, 64 + 32 * i);
    const id = e.subarray(0, 16);
    const off = e.readUInt32LE(16); const len = e.readUInt32LE(20); const flags = e.readUInt32LE(24);
    const known = [FILE_PARAMS_GUID, VDISK_SIZE_GUID, PAGE83_GUID, LSS_GUID, PSS_GUID, PARENT_LOCATOR_GUID].some((g) => g.equals(id));
    if (!known) {
      if (flags & 4) throw new ImgError('unsupported', `vhdx: unknown required metadata item ${guidText(id)}`);
      continue;
    }
    if (len === 0 || off < METADATA_TABLE_SIZE || off + len > meta[1] || len > MiB) throw bad(`metadata item ${guidText(id)} is out of bounds`);
    if (items.has(guidText(id))) throw bad(`duplicate metadata item ${guidText(id)}`);
    const v = Buffer.alloc(len);
    await src.read(v, meta[0] + off);
    items.set(guidText(id), v);
  }
  const item = (g: Buffer, min: number): Buffer => {
    const v = items.get(guidText(g));
    if (!v) throw bad(`missing required metadata item ${guidText(g)}`);
    if (v.length < min) throw bad(`metadata item ${guidText(g)} is too short`);
    return v;
  };
  const fp = item(FILE_PARAMS_GUID, 8);
  const blockSize = fp.readUInt32LE(0);
  const leaveAllocated = (fp.readUInt32LE(4) & 1) !== 0;
  const hasParent = (fp.readUInt32LE(4) & 2) !== 0;
  const size64 = item(VDISK_SIZE_GUID, 8).readBigUInt64LE(0);
  const page83 = Buffer.from(item(PAGE83_GUID, 16).subarray(0, 16));
  const lss = item(LSS_GUID, 4).readUInt32LE(0);
  const pss = item(PSS_GUID, 4).readUInt32LE(0);
  if (blockSize < MiB || blockSize > MAX_BLOCK_SIZE || (blockSize & (blockSize - 1)) !== 0) throw bad(`invalid block size ${blockSize}`);
  if (lss !== 512 && lss !== 4096) throw bad(`invalid logical sector size ${lss}`);
  if (pss !== 512 && pss !== 4096) throw bad(`invalid physical sector size ${pss}`);
  if (size64 > BigInt(MAX_IMAGE_SIZE) || size64 === 0n) throw bad(`invalid virtual disk size ${size64}`);
  const size = Number(size64);
  if (size % lss !== 0) throw bad('virtual disk size is not a multiple of the logical sector size');
  const parent = hasParent ? parseParentLocator(item(PARENT_LOCATOR_GUID, 20)) : null;
  const chunkRatio = (MAX_SECTORS_PER_BLOCK * lss) / blockSize;
  const dataBlocks = Math.ceil(size / blockSize);
  // a differencing image has a sector-bitmap entry after every chunk, the last one included
  const batEntries = hasParent ? Math.ceil(dataBlocks / chunkRatio) * (chunkRatio + 1) : dataBlocks + Math.floor((dataBlocks - 1) / chunkRatio);
  if (batEntries * 8 > bat[1]) throw bad(`BAT region too small (${bat[1]} bytes for ${batEntries} entries)`);
  const batBytes = Math.ceil((batEntries * 8) / LOG_SECTOR) * LOG_SECTOR;
  if (batBytes > MAX_BAT_BYTES) throw new ImgError('unsupported', `vhdx: BAT too large (${batBytes} bytes)`);
  const batBuf = Buffer.alloc(batBytes);
  await src.read(batBuf, bat[0]);
  // every payload block must lie inside the file, past the headers, clear of the regions
  for (let b = 0; b < dataBlocks; b++) {
    const i = b + Math.floor(b / chunkRatio);
    const lo = batBuf.readUInt32LE(i * 8); const hi = batBuf.readUInt32LE(i * 8 + 4);
    const state = lo & 7;
    if (state === 4 || state > 7) throw bad(`invalid BAT entry state ${state} for block ${b}`);
    if (state !== PAYLOAD_FULLY_PRESENT && state !== PAYLOAD_PARTIALLY_PRESENT) continue;
    const off = ((lo >>> 20) + hi * 4096) * MiB;
    // the last block may end past EOF beyond the disk's end (qemu's fixed images)
    const used = Math.min(blockSize, size - b * blockSize);
    if (off < MiB || off + used > src.size) throw bad(`BAT entry for block ${b} points outside the file (offset ${off})`);
    for (const [s, l] of spans) if (off < s + l && s < off + blockSize) throw bad(`payload block ${b} overlaps metadata`);
  }
  if (hasParent) {
    for (let c = 0; c < Math.ceil(dataBlocks / chunkRatio); c++) {
      const i = c * (chunkRatio + 1) + chunkRatio;
      const lo = batBuf.readUInt32LE(i * 8); const hi = batBuf.readUInt32LE(i * 8 + 4);
      if ((lo & 7) !== SB_BLOCK_PRESENT) continue;
      const off = ((lo >>> 20) + hi * 4096) * MiB;
      if (off < MiB || off + MiB > src.size) throw bad(`sector bitmap block ${c} points outside the file (offset ${off})`);
    }
  }
  void file;
  return {
    header, slot, batOffset: bat[0], batLength: bat[1], metaOffset: meta[0], metaLength: meta[1], blockSize, leaveAllocated,
    hasParent, parent, size, lss, pss, page83, chunkRatio, dataBlocks, batEntries, bat: batBuf,
  };
}

export class VhdxNode implements BlockNode {
  readonly driver = 'vhdx';
  backing: BlockNode | null = null;
  readonly align = 1;
  mapInvalidator: ((o: number, l: number) => void) | null = null;
  private mutex = new Mutex();
  private dataWriteGuidDone = false;
  private logSeq = 1n;
  readonly size: number;

  constructor(readonly file: BlockNode, readonly L: VhdxLayout, readonly readOnly: boolean) {
    this.size = L.size;
  }

  get filename(): string { return this.file.filename; }
  private get src(): Reader { return this.L.overlay ?? this.file; }

  private entry(block: number): { state: number; off: number } {
    const i = block + Math.floor(block / this.L.chunkRatio);
    const lo = this.L.bat.readUInt32LE(i * 8); const hi = this.L.bat.readUInt32LE(i * 8 + 4);
    return { state: lo & 7, off: ((lo >>> 20) + hi * 4096) * MiB };
  }

  private hostOf(off: number, len: number, writable: boolean) {
    const f = this.file as FileNode;
    if (typeof f.fd !== 'number') return undefined;
    if (this.L.overlay?.intersects(off, len)) return undefined;
    return { fd: f.fd, offset: off, writable, direct: !!f.direct };
  }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    length = Math.min(length, this.size - offset);
    const bs = this.L.blockSize;
    const first = Math.floor(offset / bs);
    const e0 = this.entry(first);
    if (e0.state === PAYLOAD_PARTIALLY_PRESENT) return this.partialStatus(offset, length, e0.off);
    const kind = (s: number): 'data' | 'zero' | 'unallocated' | 'partial' => {
      if (s === PAYLOAD_FULLY_PRESENT) return 'data';
      if (s === PAYLOAD_NOT_PRESENT && this.L.hasParent) return 'unallocated';
      if (s === PAYLOAD_NOT_PRESENT || s === PAYLOAD_UNDEFINED || s === PAYLOAD_ZERO || s === PAYLOAD_UNMAPPED || s === PAYLOAD_UNMAPPED_V095) return 'zero';
      if (s === PAYLOAD_PARTIALLY_PRESENT && this.L.hasParent) return 'partial';
      throw bad(`block ${Math.floor(offset / bs)} is partially present in an image without a parent`);
    };
    const k0 = kind(e0.state);
    if (k0 === 'partial') throw bad('internal: partial block');
    let len = Math.min(length, bs - (offset % bs));
    // merge following blocks of the same kind (and host-contiguous for data)
    while (len < length) {
      const b = Math.floor((offset + len) / bs);
      const e = this.entry(b);
      if (kind(e.state) !== k0) break;
      if (k0 === 'data' && e.off !== e0.off + (b - first) * bs) break;
      len += Math.min(length - len, bs);
    }
    if (k0 !== 'data') return { offset, length: len, state: k0 };
    const host = e0.off + (offset % bs);
    // in-place writes by the FUSE fast path are safe once this session's DataWriteGuid is on disk
    return { offset, length: len, state: 'data', host: this.hostOf(host, len, !this.readOnly && this.dataWriteGuidDone) };
  }

  /** a partially present block: the sector bitmap says which sectors are here (1) or in the parent (0) */
  private async partialStatus(offset: number, length: number, blockOff: number): Promise<Extent> {
    const L = this.L;
    const bs = L.blockSize;
    const block = Math.floor(offset / bs);
    const chunk = Math.floor(block / L.chunkRatio);
    const sbi = chunk * (L.chunkRatio + 1) + L.chunkRatio;
    const lo = L.bat.readUInt32LE(sbi * 8);
    if ((lo & 7) !== SB_BLOCK_PRESENT) throw bad(`block ${block} is partially present but its sector bitmap is missing`);
    const sbOff = ((lo >>> 20) + L.bat.readUInt32LE(sbi * 8 + 4) * 4096) * MiB;
    const end = Math.min(offset + length, (block + 1) * bs);
    const first = Math.floor(offset / L.lss);
    const last = Math.ceil(end / L.lss); // exclusive
    const bitBase = (block % L.chunkRatio) * (bs / L.lss) - block * (bs / L.lss);
    const b0 = first + bitBase; const b1 = last + bitBase;
    const bits = Buffer.alloc(Math.ceil(b1 / 8) - Math.floor(b0 / 8));
    await this.src.read(bits, sbOff + Math.floor(b0 / 8));
    const bit = (s: number): number => (bits[Math.floor((s + bitBase) / 8) - Math.floor(b0 / 8)] >> ((s + bitBase) % 8)) & 1;
    const v = bit(first);
    let s = first + 1;
    while (s < last && bit(s) === v) s++;
    const len = Math.min(end, s * L.lss) - offset;
    if (!v) return { offset, length: len, state: 'unallocated' };
    const host = blockOff + (offset % bs);
    return { offset, length: len, state: 'data', host: this.hostOf(host, len, false) };
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    const bs = this.L.blockSize;
    let done = 0;
    while (done < buf.length) {
      const o = offset + done;
      const n = Math.min(buf.length - done, bs - (o % bs));
      const e = this.entry(Math.floor(o / bs));
      const sub = buf.subarray(done, done + n);
      // read() is only asked for ranges blockStatus called data (partial blocks: present sectors)
      if (e.state === PAYLOAD_FULLY_PRESENT || (e.state === PAYLOAD_PARTIALLY_PRESENT && this.L.hasParent)) await this.src.read(sub, e.off + (o % bs));
      else if (e.state === PAYLOAD_PARTIALLY_PRESENT) throw bad('partially present block without a parent image');
      else sub.fill(0);
      done += n;
    }
  }

  async write(buf: Uint8Array, offset: number, flags?: WriteFlags): Promise<void> {
    if (this.readOnly) throw new ImgError('readonly', 'vhdx: image is read-only');
    if (this.L.hasParent) throw new ImgError('unsupported', 'vhdx: writing to differencing images is not supported');
    if (!this.dataWriteGuidDone) {
      await this.mutex.lock(async () => {
        if (this.dataWriteGuidDone) return;
        await this.updateHeaders({ dataWriteGuid: newGuid() });
        this.dataWriteGuidDone = true;
      });
    }
    const bs = this.L.blockSize;
    let done = 0;
    while (done < buf.length) {
      const o = offset + done;
      const n = Math.min(buf.length - done, bs - (o % bs));
      const block = Math.floor(o / bs);
      const sub = buf.subarray(done, done + n);
      const e = this.entry(block);
      if (e.state === PAYLOAD_FULLY_PRESENT) await this.file.write!(sub, e.off + (o % bs), flags);
      else {
        await this.mutex.lock(async () => {
          const e2 = this.entry(block);
          if (e2.state === PAYLOAD_FULLY_PRESENT) { await this.file.write!(sub, e2.off + (o % bs), flags); return; }
          if (e2.state === PAYLOAD_PARTIALLY_PRESENT) throw bad('partially present block without a parent image');
          await this.allocate(block, sub, o % bs);
        });
      }
      done += n;
    }
  }

  /** allocates `block` at the end of the file (zero-filled), writes `data` into it, then
   *  updates its BAT entry through the log, as qemu does */
  private async allocate(block: number, data: Uint8Array, within: number): Promise<void> {
    const bs = this.L.blockSize;
    this.mapInvalidator?.(block * bs, bs);
    const at = Math.ceil(this.file.size / MiB) * MiB;
    if (!this.file.truncate) throw new ImgError('unsupported', 'vhdx: the file cannot grow');
    await this.file.truncate(at + bs);
    await this.file.write!(data, at + within);
    const i = block + Math.floor(block / this.L.chunkRatio);
    const mb = at / MiB;
    const nb = Buffer.from(this.L.bat);
    nb.writeUInt32LE((((mb % 4096) << 20) | PAYLOAD_FULLY_PRESENT) >>> 0, i * 8);
    nb.writeUInt32LE(Math.floor(mb / 4096), i * 8 + 4);
    const sec = Math.floor((i * 8) / LOG_SECTOR) * LOG_SECTOR;
    await this.logWrite([{ offset: this.L.batOffset + sec, data: nb.subarray(sec, sec + LOG_SECTOR) }]);
    nb.copy(this.L.bat, sec, sec, sec + LOG_SECTOR);
  }

  /** qemu's vhdx_log_write_and_flush: data stable, log entry, stable, apply, stable, log reset */
  private async logWrite(sectors: { offset: number; data: Buffer }[]): Promise<void> {
    await this.file.flush?.();
    const logGuid = newGuid();
    await this.updateHeaders({ logGuid });
    const entry = buildEntry(sectors.map((s) => ({ offset: s.offset, data: Buffer.from(s.data) })), this.logSeq++, logGuid, this.file.size);
    if (entry.length > this.L.header.logLength) throw new ImgError('image', 'vhdx: the log is too small for a BAT update');
    await this.file.write!(entry, this.L.header.logOffset);
    await this.file.flush?.();
    for (const s of sectors) await this.file.write!(s.data, s.offset);
    await this.file.flush?.();
    await this.updateHeaders({ logGuid: Buffer.alloc(16) });
  }

  /** writes the header into the other slot twice (both copies current), as qemu does */
  async updateHeaders(change: Partial<Header>): Promise<void> {
    for (let k = 0; k < 2; k++) {
      const h: Header = { ...this.L.header, ...change, seq: this.L.header.seq + 1n };
      const slot: 0 | 1 = this.L.slot === 0 ? 1 : 0;
      await this.file.write!(serializeHeader(h), slot === 0 ? HEADER1 : HEADER2);
      await this.file.flush?.();
      this.L.header = h;
      this.L.slot = slot;
    }
  }

  async flush(): Promise<void> { await this.file.flush?.(); }
  async allocatedSize(): Promise<number> { return this.file.allocatedSize ? this.file.allocatedSize() : this.file.size; }
  async infoExtra(): Promise<Record<string, unknown>> { return { 'cluster-size': this.L.blockSize }; }
  async close(): Promise<void> {
    await this.backing?.close().catch(() => undefined);
    await this.file.close();
  }
}

/** opens the parent named by relative_path, then absolute_win32_path/volume_path, and checks its linkage */
async function openParent(loc: Map<string, string>, ctx: OpenContext): Promise<BlockNode | null> {
  const names = ['relative_path', 'absolute_win32_path', 'volume_path'].map((k) => loc.get(k)).filter((v): v is string => !!v)
    .map((v) => v.replace(/\\/g, '/').replace(/^\.\//, ''));
  if (names.length === 0) throw bad('parent locator names no parent path');
  let lastErr: unknown = null;
  for (const name of names) {
    let p: BlockNode | null;
    try {
      p = await ctx.openBacking(name, 'vhdx');
    } catch (e) { lastErr = e; continue; }
    if (!p) return null; // backing=null: the user asked for no parent
    const link = (loc.get('parent_linkage') ?? '').toLowerCase();
    const link2 = (loc.get('parent_linkage2') ?? '').toLowerCase();
    const pv = p as VhdxNode;
    if (pv.L && link !== braced(pv.L.header.dataWriteGuid) && link2 !== braced(pv.L.header.dataWriteGuid)) {
      await p.close();
      throw bad(`parent '${name}' does not match the parent linkage (its DataWriteGuid changed)`);
    }
    return p;
  }
  throw new ImgError((lastErr as ImgError)?.kind ?? 'image', `vhdx: could not open the parent image: ${(lastErr as Error)?.message ?? 'not found'}`);
}

export async function openVhdx(file: BlockNode, ctx: OpenContext, forCheck = false): Promise<VhdxNode> {
  const r = new OptionReader(ctx.options, 'vhdx');
  r.finish();
  const { header, slot } = await readHeaders(file);
  let overlay: Overlay | null = null;
  let logReplayed = false;
  if (!isZeroGuid(header.logGuid) && header.logLength > 0) {
    const seq = await searchLog(file, header.logOffset, header.logLength, header.logGuid);
    if (seq) {
      if (ctx.readOnly) {
        // per the spec the log must be replayed even for reads: do it in memory
        overlay = new Overlay(file, seq.ops, seq.lastFileOffset);
      } else {
        await replayToFile(file, seq);
        logReplayed = true;
      }
    }
  }
  const src: Reader = overlay ?? file;
  const layout = await parseLayout(file, src, header, slot);
  const node = new VhdxNode(file, { ...layout, logReplayed, overlay }, ctx.readOnly);
  if (layout.parent) {
    try {
      node.backing = await openParent(layout.parent, ctx);
    } catch (e) {
      throw e instanceof ImgError ? e : new ImgError('image', `vhdx: could not open the parent image: ${(e as Error).message}`);
    }
  }
  if (!ctx.readOnly) {
    // a new FileWriteGuid for this session, and an empty log (qemu: vhdx_update_headers on open)
    await node.updateHeaders({ fileWriteGuid: newGuid(), logGuid: Buffer.alloc(16) });
  }
  void forCheck;
  return node;
}

export async function checkVhdx(file: BlockNode, ctx: OpenContext, repair: 'none' | 'leaks' | 'all'): Promise<CheckResult> {
  const res: CheckResult = { checkErrors: 0, corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, messages: [] };
  const node = await openVhdx(file, { ...ctx, readOnly: repair === 'none' }, true);
  const L = node.L;
  if (L.logReplayed) { res.corruptionsFixed++; res.corruptions++; res.messages.push('Repairing: the log was replayed'); }
  if (L.overlay) { res.corruptions++; res.messages.push('ERROR: the image has a log that needs to be replayed (use -r all)'); }
  // payload blocks: inside the file (checked on open) and not overlapping each other
  const blocks: [number, number][] = [];
  for (let b = 0; b < L.dataBlocks; b++) {
    const i = b + Math.floor(b / L.chunkRatio);
    const lo = L.bat.readUInt32LE(i * 8);
    if ((lo & 7) !== PAYLOAD_FULLY_PRESENT) continue;
    blocks.push([((lo >>> 20) + L.bat.readUInt32LE(i * 8 + 4) * 4096) * MiB, b]);
  }
  blocks.sort((a, b) => a[0] - b[0]);
  for (let k = 1; k < blocks.length; k++) {
    if (blocks[k][0] < blocks[k - 1][0] + L.blockSize) {
      res.corruptions++;
      res.messages.push(`ERROR: VHDX BAT data block ${blocks[k][1]} overlaps with data block ${blocks[k - 1][1]}`);
    }
  }
  return res;
}

export const CREATE_OPTIONS = ['size', 'subformat', 'block_state_zero', 'block_size', 'log_size', 'preallocation', 'nocow',
  'extent_size_hint', 'logical_sector_size', 'physical_sector_size'];

export async function createVhdx(ctx: CreateContext): Promise<void> {
  const r = new OptionReader(ctx.options, 'vhdx');
  r.markUsed('size');
  const sub = r.choice('subformat', ['dynamic', 'fixed'] as const, 'dynamic');
  const zeroBlocks = r.bool('block_state_zero', true);
  let blockSize = r.int('block_size', 0);
  let logSize = r.int('log_size', MiB);
  const lss = r.int('logical_sector_size', 512);
  const pss = r.int('physical_sector_size', 512);
  r.choice('preallocation', ['off', 'falloc', 'full'] as const, 'off');
  r.bool('nocow', false);
  r.int('extent_size_hint', 0);
  r.finish();
  if (ctx.size === null) throw new ImgError('usage', 'vhdx: image size required');
  if (lss !== 512 && lss !== 4096) throw new ImgError('usage', 'vhdx: logical_sector_size must be 512 or 4096');
  if (pss !== 512 && pss !== 4096) throw new ImgError('usage', 'vhdx: physical_sector_size must be 512 or 4096');
  const size = Math.ceil(ctx.size / lss) * lss;
  if (size > MAX_IMAGE_SIZE) throw new ImgError('usage', 'Image size too large; max of 64TB');
  if (size === 0) throw new ImgError('usage', 'vhdx: image size must not be zero');
  logSize = Math.ceil(logSize / MiB) * MiB;
  if (logSize > 0xffffffff) throw new ImgError('usage', 'Log size must be smaller than 4 GB');
  if (logSize < MiB) throw new ImgError('usage', 'Log size must be a multiple of 1 MB');
  if (blockSize) {
    blockSize = Math.min(Math.ceil(blockSize / MiB) * MiB, MAX_BLOCK_SIZE);
  } else {
    blockSize = size > 32 * 1024 * 1024 * MiB ? 64 * MiB : size > 100 * 1024 * MiB ? 32 * MiB : size > 1024 * MiB ? 16 * MiB : 8 * MiB;
  }
  if ((blockSize & (blockSize - 1)) !== 0) throw new ImgError('usage', 'Block size must be a power of two');

  const chunkRatio = (MAX_SECTORS_PER_BLOCK * lss) / blockSize;
  const dataBlocks = Math.ceil(size / blockSize);
  const batEntries = dataBlocks + Math.floor((dataBlocks - 1) / chunkRatio);
  const logOffset = MiB;
  const batOffset = Math.ceil((MiB + logSize) / MiB) * MiB;
  const batLength = Math.ceil((batEntries * 8) / MiB) * MiB;
  if (batLength > MAX_BAT_BYTES) throw new ImgError('usage', 'vhdx: the BAT would be too large; use a larger block_size');
  const metaOffset = batOffset + batLength;
  const dataOffset = metaOffset + 5 * MiB; // as qemu: 4 MiB spare after the metadata

  await createFile(ctx.filename, 0, 'off');
  await withFileRw(ctx.filename, async (f) => {
    const id = Buffer.alloc(64 * 1024);
    id.write('vhdxfile', 0, 'latin1');
    id.write('imgmount', 8, 'utf16le');
    await f.write(id, 0);
    const fileGuid = newGuid(); const dataGuid = newGuid();
    for (const [slot, seq] of [[HEADER1, 0n], [HEADER2, 1n]] as const) {
      await f.write(serializeHeader({ seq, fileWriteGuid: fileGuid, dataWriteGuid: dataGuid, logGuid: Buffer.alloc(16), logVersion: 0, version: 1, logLength: logSize, logOffset }), slot);
    }
    const rt = Buffer.alloc(REGION_SIZE);
    rt.write('regi', 0, 'latin1');
    rt.writeUInt32LE(2, 8);
    BAT_GUID.copy(rt, 16); rt.writeBigUInt64LE(BigInt(batOffset), 32); rt.writeUInt32LE(batLength, 40); rt.writeUInt32LE(1, 44);
    METADATA_GUID.copy(rt, 48); rt.writeBigUInt64LE(BigInt(metaOffset), 64); rt.writeUInt32LE(MiB, 72); rt.writeUInt32LE(1, 76);
    rt.writeUInt32LE(checksum(rt), 4);
    await f.write(rt, REGION1);
    await f.write(rt, REGION1 + REGION_SIZE);
    // metadata table and items
    const mt = Buffer.alloc(METADATA_TABLE_SIZE + 64);
    mt.write('metadata', 0, 'latin1');
    const items: [Buffer, Buffer, number][] = [];
    const fp = Buffer.alloc(8); fp.writeUInt32LE(blockSize, 0); fp.writeUInt32LE(sub === 'fixed' ? 1 : 0, 4);
    const vs = Buffer.alloc(8); vs.writeBigUInt64LE(BigInt(size), 0);
    const l = Buffer.alloc(4); l.writeUInt32LE(lss, 0);
    const p = Buffer.alloc(4); p.writeUInt32LE(pss, 0);
    items.push([FILE_PARAMS_GUID, fp, 4], [VDISK_SIZE_GUID, vs, 6], [PAGE83_GUID, newGuid(), 6], [LSS_GUID, l, 6], [PSS_GUID, p, 6]);
    mt.writeUInt16LE(items.length, 10);
    let off = METADATA_TABLE_SIZE;
    items.forEach(([g, v, flags], i) => {
      const e = mt.subarray(32 + 32 * i, 64 + 32 * i);
      g.copy(e, 0); e.writeUInt32LE(off, 16); e.writeUInt32LE(v.length, 20); e.writeUInt32LE(flags, 24);
      v.copy(mt, off);
      off += v.length;
    });
    await f.write(mt, metaOffset);
    // BAT
    await f.truncate(sub === 'fixed' ? dataOffset + size : dataOffset);
    const bat = Buffer.alloc(batEntries * 8);
    if (sub === 'fixed' || zeroBlocks) {
      for (let b = 0; b < dataBlocks; b++) {
        const i = b + Math.floor(b / chunkRatio);
        if (zeroBlocks) { bat.writeUInt32LE(PAYLOAD_ZERO, i * 8); continue; }
        const mb = (dataOffset + b * blockSize) / MiB;
        bat.writeUInt32LE((((mb % 4096) << 20) | PAYLOAD_FULLY_PRESENT) >>> 0, i * 8);
        bat.writeUInt32LE(Math.floor(mb / 4096), i * 8 + 4);
      }
      await f.write(bat, batOffset);
    }
  });
}

export const vhdxDriver: FormatDriver = {
  name: 'vhdx',
  probe(head: Uint8Array): number {
    return head.length >= 8 && Buffer.from(head.buffer, head.byteOffset, 8).toString('latin1') === 'vhdxfile' ? 100 : 0;
  },
  createOptions: CREATE_OPTIONS,
  open: (file, ctx) => openVhdx(file, ctx),
  create: (ctx) => createVhdx(ctx),
  check: (file, ctx, repair) => checkVhdx(file, ctx, repair),
};
