// vpc: Microsoft Virtual PC / Hyper-V VHD images, fixed and dynamic (Microsoft's "Virtual Hard
// Disk Image Format Specification" v1.0, with qemu's block/vpc.c size rules).
//   fixed:   guest data, then a 512-byte footer at the end of the file
//   dynamic: footer copy at 0, dynamic disk header ("cxsparse"), BAT of 32-bit sector numbers,
//            blocks of [sector bitmap | block data], footer at the end.
import crypto from 'node:crypto';
import { ImgError } from '../../core/errors';
import type { BlockNode, CreateContext, Extent, FormatDriver, OpenContext, WriteFlags } from '../../core/node';
import { OptionReader } from '../../core/options';
import { createFile, FileNode, withFileRw } from '../../protocols/file';
import { Mutex } from '../../core/mutex';

export const FOOTER_SIZE = 512;
const DYN_HEADER_SIZE = 1024;
const TYPE_FIXED = 2;
const TYPE_DYNAMIC = 3;
const TYPE_DIFF = 4;
const TIMESTAMP_BASE = 946684800; // 2000-01-01 UTC
const CHS_MAX_C = 65535;
const CHS_MAX_H = 16;
const CHS_MAX_S = 255;
export const MAX_GEOMETRY = CHS_MAX_C * CHS_MAX_H * CHS_MAX_S;
/** qemu's limit: 2040 GiB */
export const MAX_SECTORS = 0xff000000;
const DEFAULT_BLOCK_SIZE = 0x200000;
/** bound for the in-memory BAT (qemu: INT_MAX / 4 entries); 64 Mi entries = 256 MiB */
const MAX_BAT_ENTRIES = 64 * 1024 * 1024;
const BAT_UNUSED = 0xffffffff;

export function vpcChecksum(buf: Uint8Array, skipAt = 64): number {
  let s = 0;
  for (let i = 0; i < buf.length; i++) {
    if (i >= skipAt && i < skipAt + 4) continue;
    s = (s + buf[i]) >>> 0;
  }
  return (~s) >>> 0;
}

export interface Footer {
  raw: Buffer;
  features: number;
  dataOffset: number;
  creatorApp: string;
  origSize: number;
  currentSize: number;
  cyls: number;
  heads: number;
  secs: number;
  type: number;
  checksum: number;
}

function u64(b: Buffer, at: number): number {
  const v = b.readBigUInt64BE(at);
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
}

export function parseFooter(raw: Buffer): Footer {
  return {
    raw,
    features: raw.readUInt32BE(8),
    dataOffset: u64(raw, 16),
    creatorApp: raw.toString('latin1', 28, 32),
    origSize: u64(raw, 40),
    currentSize: u64(raw, 48),
    cyls: raw.readUInt16BE(56),
    heads: raw[58],
    secs: raw[59],
    type: raw.readUInt32BE(60),
    checksum: raw.readUInt32BE(64),
  };
}

const isConectix = (b: Uint8Array): boolean => b.length >= 8 && Buffer.from(b.buffer, b.byteOffset, 8).toString('latin1') === 'conectix';

/** The guest size qemu derives from a footer (CHS geometry or current_size, by creator app). */
export function guestSectors(f: Footer, force: 'chs' | 'current_size' | null): number {
  const chs = f.cyls * f.heads * f.secs;
  const app = f.creatorApp;
  // Virtual PC and qemu's 'qemu' images use the CHS geometry; Hyper-V ('win '), disk2vhd
  // ('d2v '), qemu with force_size ('qem2'), XenServer ('tap\0') and XenConverter ('CTXS')
  // use current_size. An image with the maximum geometry always uses current_size.
  let useChs = !['win ', 'qem2', 'd2v ', 'CTXS', 'tap\0'].includes(app);
  if (force === 'chs') useChs = true;
  if (!useChs || chs === MAX_GEOMETRY || force === 'current_size') return Math.floor(f.currentSize / 512);
  return chs;
}

/** The VHD specification's CHS calculation (appendix), as qemu's calculate_geometry. */
export function calculateGeometry(totalSectors: number): { cyls: number; heads: number; secs: number } {
  totalSectors = Math.min(totalSectors, MAX_GEOMETRY);
  let secs: number; let heads: number; let cth: number;
  if (totalSectors >= 65535 * 16 * 63) {
    secs = 255; heads = 16; cth = Math.floor(totalSectors / secs);
  } else {
    secs = 17;
    cth = Math.floor(totalSectors / secs);
    heads = Math.max(4, Math.ceil(cth / 1024));
    if (cth >= heads * 1024 || heads > 16) { secs = 31; heads = 16; cth = Math.floor(totalSectors / secs); }
    if (cth >= heads * 1024) { secs = 63; heads = 16; cth = Math.floor(totalSectors / secs); }
  }
  return { cyls: Math.floor(cth / heads), heads, secs };
}


interface Dyn {
  blockSize: number;
  bitmapSize: number;
  bat: Uint32Array;
  batOffset: number;
  freeOffset: number;
}

export class VpcNode implements BlockNode {
  readonly driver = 'vpc';
  readonly backing = null;
  readonly align = 1;
  mapInvalidator: ((o: number, l: number) => void) | null = null;
  private mutex = new Mutex();
  /** blocks whose sector bitmap is known to be all ones (safe for in-place writes) */
  private fullBitmap = new Set<number>();

  constructor(readonly file: BlockNode, readonly footer: Footer, readonly size: number, readonly readOnly: boolean,
    private dyn: Dyn | null) {}

  get filename(): string { return this.file.filename; }
  get fixed(): boolean { return this.dyn === null; }

  private hostOf(off: number, writable: boolean) {
    const f = this.file as FileNode;
    return typeof f.fd === 'number' ? { fd: f.fd, offset: off, writable, direct: !!f.direct } : undefined;
  }

  /** host offset of the block data for guest `offset`, or -1 */
  private dataOffset(offset: number): number {
    const d = this.dyn!;
    const idx = Math.floor(offset / d.blockSize);
    const e = idx < d.bat.length ? d.bat[idx] : BAT_UNUSED;
    if (e === BAT_UNUSED) return -1;
    return e * 512 + d.bitmapSize + (offset % d.blockSize);
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    if (!this.dyn) return this.file.read(buf, offset);
    const bs = this.dyn.blockSize;
    let done = 0;
    while (done < buf.length) {
      const o = offset + done;
      const n = Math.min(buf.length - done, bs - (o % bs));
      const h = this.dataOffset(o);
      if (h < 0) buf.subarray(done, done + n).fill(0);
      else await this.file.read(buf.subarray(done, done + n), h);
      done += n;
    }
  }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    length = Math.min(length, this.size - offset);
    if (!this.dyn) {
      const e = await this.file.blockStatus(offset, length);
      return {
        offset, length: Math.min(e.length, length), state: e.state === 'unallocated' ? 'zero' : e.state,
        host: e.host ? { ...e.host, writable: e.host.writable && !this.readOnly } : undefined,
      };
    }
    const bs = this.dyn.blockSize;
    const first = this.dataOffset(offset);
    let len = Math.min(length, bs - (offset % bs));
    if (first < 0) {
      while (len < length && this.dataOffset(offset + len) < 0) len += Math.min(length - len, bs);
      return { offset, length: Math.min(len, length), state: 'zero' };
    }
    const idx = Math.floor(offset / bs);
    const writable = !this.readOnly && (await this.bitmapFull(idx));
    // blocks are separated by their bitmaps, so host-contiguity ends at a block boundary
    return { offset, length: len, state: 'data', host: this.hostOf(first, writable) };
  }

  private async bitmapFull(idx: number): Promise<boolean> {
    if (this.fullBitmap.has(idx)) return true;
    const d = this.dyn!;
    const b = Buffer.alloc(d.bitmapSize);
    await this.file.read(b, d.bat[idx] * 512);
    const need = Math.ceil(d.blockSize / 512 / 8);
    for (let i = 0; i < need; i++) if (b[i] !== 0xff) return false;
    this.fullBitmap.add(idx);
    return true;
  }

  async write(buf: Uint8Array, offset: number, flags?: WriteFlags): Promise<void> {
    if (this.readOnly) throw new ImgError('readonly', 'vpc: image is read-only');
    if (!this.dyn) {
      await this.file.write!(buf, offset, flags);
      return;
    }
    const bs = this.dyn.blockSize;
    let done = 0;
    while (done < buf.length) {
      const o = offset + done;
      const n = Math.min(buf.length - done, bs - (o % bs));
      const idx = Math.floor(o / bs);
      let h = this.dataOffset(o);
      if (h < 0 || !this.fullBitmap.has(idx)) {
        await this.mutex.lock(async () => {
          if (this.dataOffset(o) < 0) await this.allocBlock(idx);
          await this.markBitmap(idx);
        });
        h = this.dataOffset(o);
      }
      await this.file.write!(buf.subarray(done, done + n), h, flags);
      done += n;
    }
  }

  // As qemu: every sector of a block we write is marked present (the reads here ignore the
  // bitmap, as qemu's do; other VHD readers honour it).
  private async markBitmap(idx: number): Promise<void> {
    if (this.fullBitmap.has(idx) || (await this.bitmapFull(idx))) return;
    const d = this.dyn!;
    this.mapInvalidator?.(idx * d.blockSize, d.blockSize);
    await this.file.write!(Buffer.alloc(d.bitmapSize, 0xff), d.bat[idx] * 512);
    this.fullBitmap.add(idx);
  }

  private async allocBlock(idx: number): Promise<void> {
    const d = this.dyn!;
    if (idx >= d.bat.length) throw new ImgError('image', `vpc: block ${idx} is beyond the BAT`);
    const at = d.freeOffset;
    const next = at + d.bitmapSize + d.blockSize;
    if (at / 512 >= BAT_UNUSED) throw new ImgError('nospace', 'vpc: the image file is full (4 GiB sectors)');
    this.mapInvalidator?.(idx * d.blockSize, d.blockSize);
    // anything past the old footer (junk after the end) must not show up as block data
    const fileEnd = this.file.size;
    if (fileEnd > at + FOOTER_SIZE) {
      const end = Math.min(fileEnd, next);
      if (this.file.writeZeroes) await this.file.writeZeroes(at, end - at);
      else await this.file.write!(Buffer.alloc(end - at), at);
    }
    await this.file.write!(Buffer.alloc(d.bitmapSize, 0xff), at);
    // the footer moves behind the new block (the old one is covered by the bitmap)
    await this.file.write!(this.footer.raw, next);
    await this.file.flush?.();
    const e = Buffer.alloc(4);
    e.writeUInt32BE(at / 512, 0);
    await this.file.write!(e, d.batOffset + idx * 4);
    d.bat[idx] = at / 512;
    d.freeOffset = next;
    this.fullBitmap.add(idx);
  }

  async flush(): Promise<void> { await this.file.flush?.(); }
  async allocatedSize(): Promise<number> { return this.file.allocatedSize ? this.file.allocatedSize() : this.file.size; }
  async infoExtra(): Promise<Record<string, unknown>> {
    return this.dyn ? { 'cluster-size': this.dyn.blockSize } : {};
  }
  async close(): Promise<void> { await this.file.close(); }
}

async function readFooter(file: BlockNode): Promise<{ footer: Footer; atStart: boolean }> {
  if (file.size < FOOTER_SIZE) throw new ImgError('image', 'vpc: invalid VPC image (file too small)');
  let raw = Buffer.alloc(FOOTER_SIZE);
  await file.read(raw, 0);
  let atStart = true;
  if (!isConectix(raw)) {
    raw = Buffer.alloc(FOOTER_SIZE);
    await file.read(raw, file.size - FOOTER_SIZE);
    if (!isConectix(raw)) throw new ImgError('image', 'vpc: invalid VPC image (no conectix footer)');
    atStart = false;
  }
  const footer = parseFooter(raw);
  if (vpcChecksum(raw) !== footer.checksum) throw new ImgError('image', 'vpc: Incorrect header checksum');
  return { footer, atStart };
}

export async function openVpc(file: BlockNode, ctx: OpenContext): Promise<VpcNode> {
  const r = new OptionReader(ctx.options, 'vpc');
  const fsc = r.str('force_size_calc');
  if (fsc !== undefined && fsc !== 'chs' && fsc !== 'current_size') {
    throw new ImgError('usage', `vpc: invalid value '${fsc}' for force_size_calc (expected chs or current_size)`);
  }
  r.finish();
  const { footer, atStart } = await readFooter(file);
  if (atStart && footer.type === TYPE_DIFF) throw new ImgError('unsupported', 'vpc: differencing VHD images are not supported');
  if (atStart && footer.type !== TYPE_DYNAMIC) throw new ImgError('image', `vpc: unsupported disk type ${footer.type} with a footer copy at the start`);
  const sectors = guestSectors(footer, (fsc as 'chs' | 'current_size' | undefined) ?? null);
  if (sectors > MAX_SECTORS) throw new ImgError('image', 'vpc: image size is too large (max 2040 GiB)');
  const size = sectors * 512;
  // hand the guest a whole number of sectors only
  if (!atStart) {
    if (size > file.size - FOOTER_SIZE) throw new ImgError('image', `vpc: fixed image is truncated (${size} bytes of data expected, ${file.size - FOOTER_SIZE} present)`);
    return new VpcNode(file, footer, size, ctx.readOnly, null);
  }
  if (footer.dataOffset > file.size - DYN_HEADER_SIZE) throw new ImgError('image', 'vpc: dynamic disk header is beyond the end of the file');
  const h = Buffer.alloc(DYN_HEADER_SIZE);
  await file.read(h, footer.dataOffset);
  if (h.toString('latin1', 0, 8) !== 'cxsparse') throw new ImgError('image', 'vpc: invalid dynamic disk header (no cxsparse)');
  const batOffset = u64(h, 16);
  const entries = h.readUInt32BE(28);
  const blockSize = h.readUInt32BE(32);
  if (blockSize < 512 || (blockSize & (blockSize - 1)) !== 0) throw new ImgError('image', `vpc: Invalid block size ${blockSize}`);
  if (size / blockSize > 0xffffffff) throw new ImgError('image', 'vpc: Too many blocks');
  if (entries * blockSize < size) throw new ImgError('image', 'vpc: Page table too small');
  if (entries > MAX_BAT_ENTRIES) throw new ImgError('image', `vpc: Max Table Entries too large (${entries})`);
  if (batOffset + entries * 4 > file.size) throw new ImgError('image', 'vpc: the BAT is beyond the end of the file');
  const bitmapSize = Math.ceil(blockSize / (8 * 512) / 512) * 512;
  const raw = Buffer.alloc(entries * 4);
  await file.read(raw, batOffset);
  const bat = new Uint32Array(entries);
  let free = Math.ceil((batOffset + entries * 4) / 512) * 512;
  for (let i = 0; i < entries; i++) {
    const e = raw.readUInt32BE(i * 4);
    bat[i] = e;
    if (e !== BAT_UNUSED) {
      const start = e * 512;
      const end = start + bitmapSize + blockSize;
      // a block over the footer copy, the dynamic header or the BAT would let writes corrupt them
      for (const [s0, l] of [[0, FOOTER_SIZE], [footer.dataOffset, DYN_HEADER_SIZE], [batOffset, entries * 4]]) {
        if (start < s0 + l && s0 < end) throw new ImgError('image', `vpc: block ${i} overlaps the image metadata`);
      }
      if (end > free) free = end;
    }
  }
  if (free > file.size) {
    throw new ImgError('image', 'vpc: free_data_block_offset points after the end of file. The image has been truncated.');
  }
  return new VpcNode(file, footer, size, ctx.readOnly, { blockSize, bitmapSize, bat, batOffset, freeOffset: free });
}

export const CREATE_OPTIONS = ['size', 'subformat', 'force_size', 'preallocation', 'nocow', 'extent_size_hint'];

export function buildFooter(totalSize: number, geo: { cyls: number; heads: number; secs: number }, type: number,
  forceSize: boolean): Buffer {
  const f = Buffer.alloc(FOOTER_SIZE);
  f.write('conectix', 0, 'latin1');
  f.writeUInt32BE(2, 8);
  f.writeUInt32BE(0x00010000, 12);
  f.writeBigUInt64BE(type === TYPE_DYNAMIC ? 512n : 0xffffffffffffffffn, 16);
  f.writeUInt32BE((Math.floor(Date.now() / 1000) - TIMESTAMP_BASE) >>> 0, 24);
  f.write(forceSize ? 'qem2' : 'qemu', 28, 'latin1');
  f.writeUInt16BE(5, 32);
  f.writeUInt16BE(3, 34);
  f.write('Wi2k', 36, 'latin1');
  f.writeBigUInt64BE(BigInt(totalSize), 40);
  f.writeBigUInt64BE(BigInt(totalSize), 48);
  f.writeUInt16BE(geo.cyls, 56);
  f[58] = geo.heads;
  f[59] = geo.secs;
  f.writeUInt32BE(type, 60);
  crypto.randomFillSync(f, 68, 16);
  f[68 + 6] = (f[68 + 6] & 0x0f) | 0x40;
  f[68 + 8] = (f[68 + 8] & 0x3f) | 0x80;
  f.writeUInt32BE(vpcChecksum(f), 64);
  return f;
}

export async function createVpc(ctx: CreateContext): Promise<void> {
  const r = new OptionReader(ctx.options, 'vpc');
  r.markUsed('size');
  const sub = r.choice('subformat', ['dynamic', 'fixed'] as const, 'dynamic');
  const force = r.bool('force_size', false);
  // protocol-level options of qemu's file driver: accepted, no effect on the format
  r.choice('preallocation', ['off', 'falloc', 'full'] as const, 'off');
  r.bool('nocow', false);
  r.int('extent_size_hint', 0);
  r.finish();
  if (ctx.size === null) throw new ImgError('usage', 'vpc: image size required');
  let totalSize = ctx.size;
  let geo = { cyls: 0, heads: 0, secs: 0 };
  if (force) {
    geo = { cyls: CHS_MAX_C, heads: CHS_MAX_H, secs: CHS_MAX_S };
  } else {
    const want = Math.min(MAX_GEOMETRY, Math.floor(totalSize / 512));
    for (let i = 0; want > geo.cyls * geo.heads * geo.secs; i++) geo = calculateGeometry(want + i);
  }
  let sectors: number;
  if (geo.cyls * geo.heads * geo.secs === MAX_GEOMETRY) {
    sectors = Math.floor(totalSize / 512);
    if (sectors > MAX_SECTORS) throw new ImgError('usage', 'Disk size is too large, max size is 2040 GiB');
  } else {
    sectors = geo.cyls * geo.heads * geo.secs;
    totalSize = sectors * 512;
  }
  const type = sub === 'fixed' ? TYPE_FIXED : TYPE_DYNAMIC;
  const footer = buildFooter(totalSize, geo, type, force);
  await createFile(ctx.filename, 0, 'off');
  await withFileRw(ctx.filename, async (f) => {
    if (type === TYPE_FIXED) {
      await f.truncate(totalSize + FOOTER_SIZE);
      await f.write(footer, totalSize);
    } else {
      const blockSize = DEFAULT_BLOCK_SIZE;
      const entries = Math.ceil(sectors / (blockSize / 512));
      const batBytes = Math.ceil((entries * 4) / 512) * 512;
      const batOffset = 3 * 512;
      await f.write(footer, 0);
      const bat = Buffer.alloc(batBytes, 0xff);
      await f.write(bat, batOffset);
      const h = Buffer.alloc(DYN_HEADER_SIZE);
      h.write('cxsparse', 0, 'latin1');
      h.writeBigUInt64BE(0xffffffffffffffffn, 8);
      h.writeBigUInt64BE(BigInt(batOffset), 16);
      h.writeUInt32BE(0x00010000, 24);
      h.writeUInt32BE(entries, 28);
      h.writeUInt32BE(blockSize, 32);
      h.writeUInt32BE(vpcChecksum(h, 36), 36);
      await f.write(h, 512);
      await f.write(footer, batOffset + batBytes);
    }
  });
}

/** A fixed VHD has its only footer at the end: recognised from the file's last bytes. */
export function probeTail(tail: Uint8Array, fileSize: number): number {
  if (tail.length < FOOTER_SIZE) return 0;
  const raw = Buffer.from(tail.buffer, tail.byteOffset + tail.length - FOOTER_SIZE, FOOTER_SIZE);
  if (!isConectix(raw)) return 0;
  const f = parseFooter(Buffer.from(raw));
  if (vpcChecksum(raw) !== f.checksum || f.type !== TYPE_FIXED) return 0;
  const size = guestSectors(f, null) * 512;
  return size <= fileSize - FOOTER_SIZE ? 100 : 0;
}

export const vpcDriver: FormatDriver & { probeTail(tail: Uint8Array, fileSize: number): number } = {
  name: 'vpc',
  probe(head: Uint8Array): number { return isConectix(head) ? 100 : 0; },
  probeTail,
  createOptions: CREATE_OPTIONS,
  open: (file, ctx) => openVpc(file, ctx),
  create: (ctx) => createVpc(ctx),
};
