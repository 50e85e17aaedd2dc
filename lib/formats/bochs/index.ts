// bochs growing ("Redolog"/"Growing") images, read-only: a 512-byte little-endian header
// (version 1 or 2), a catalog of extent indexes, then per allocated extent a sector bitmap
// followed by the extent's sectors.
import { ImgError } from '../../core/errors';
import type { BlockNode, Extent, FormatDriver, OpenContext } from '../../core/node';
import { OptionReader } from '../../core/options';
import type { FileNode } from '../../protocols/file';

const HEADER_SIZE = 512;
const MAGIC = 'Bochs Virtual HD Image';
const V1 = 0x00010000;
const V2 = 0x00020000;
const UNALLOCATED = 0xffffffff;
/** qemu's limits: 1M catalog entries (bximage's largest image), extents 512 B .. 8 MiB */
const MAX_CATALOG = 0x100000;
const MAX_EXTENT = 0x800000;
const BITMAP_CACHE = 4096;

function bad(msg: string): never { throw new ImgError('image', `bochs: ${msg}`); }

function cstr(b: Buffer, at: number, len: number): string {
  const s = b.subarray(at, at + len);
  const z = s.indexOf(0);
  return s.toString('latin1', 0, z < 0 ? len : z);
}

export interface BochsHeader {
  version: number;
  headerSize: number;
  catalogSize: number;
  bitmapSize: number;
  extentSize: number;
  diskSize: number;
}

export function parseBochsHeader(h: Buffer): BochsHeader {
  if (cstr(h, 0, 32) !== MAGIC) bad('bad magic');
  if (cstr(h, 32, 16) !== 'Redolog' || cstr(h, 48, 16) !== 'Growing') bad(`unsupported image type '${cstr(h, 32, 16)}/${cstr(h, 48, 16)}' (only Redolog/Growing)`);
  const version = h.readUInt32LE(64);
  if (version !== V1 && version !== V2) bad(`unsupported version 0x${version.toString(16)}`);
  const disk = version === V1 ? h.readBigUInt64LE(84) : h.readBigUInt64LE(88);
  if (disk > BigInt(Number.MAX_SAFE_INTEGER)) bad('disk size out of range');
  return {
    version,
    headerSize: h.readUInt32LE(68),
    catalogSize: h.readUInt32LE(72),
    bitmapSize: h.readUInt32LE(76),
    extentSize: h.readUInt32LE(80),
    diskSize: Number(disk),
  };
}

export class BochsNode implements BlockNode {
  readonly driver = 'bochs';
  readonly readOnly = true;
  readonly align = 1;
  readonly backing = null;
  mapInvalidator = null;
  readonly size: number;
  private bitmapBlocks: number;
  private extentBlocks: number;
  private dataOffset: number;
  private bitmaps = new Map<number, Buffer>();

  constructor(readonly file: BlockNode, readonly hdr: BochsHeader, private catalog: Uint32Array) {
    // as qemu: the size is the whole sectors of the disk size
    this.size = Math.floor(hdr.diskSize / 512) * 512;
    this.bitmapBlocks = 1 + Math.floor((hdr.bitmapSize - 1) / 512);
    this.extentBlocks = 1 + Math.floor((hdr.extentSize - 1) / 512);
    this.dataOffset = hdr.headerSize + hdr.catalogSize * 4;
  }
  get filename(): string { return this.file.filename; }

  /** host offset of extent `idx`'s bitmap */
  extentBase(idx: number): number {
    return this.dataOffset + 512 * this.catalog[idx] * (this.extentBlocks + this.bitmapBlocks);
  }

  private async bitmap(idx: number): Promise<Buffer> {
    let b = this.bitmaps.get(idx);
    if (b) return b;
    b = Buffer.alloc(Math.ceil(this.hdr.extentSize / 512 / 8));
    await this.file.read(b, this.extentBase(idx));
    if (this.bitmaps.size >= BITMAP_CACHE) this.bitmaps.delete(this.bitmaps.keys().next().value as number);
    this.bitmaps.set(idx, b);
    return b;
  }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    const es = this.hdr.extentSize;
    const idx = Math.floor(offset / es);
    const extEnd = Math.min((idx + 1) * es, this.size);
    const limit = Math.min(offset + length, extEnd);
    if (this.catalog[idx] === UNALLOCATED) {
      // merge following unallocated extents
      let end = extEnd;
      for (let j = idx + 1; end < offset + length && j < this.catalog.length && this.catalog[j] === UNALLOCATED; j++) end = Math.min((j + 1) * es, this.size);
      return { offset, length: Math.min(offset + length, end) - offset, state: 'zero' };
    }
    const bm = await this.bitmap(idx);
    const sec = (o: number): number => Math.floor((o - idx * es) / 512);
    const bit = (s: number): boolean => ((bm[s >> 3] >> (s & 7)) & 1) === 1;
    const first = bit(sec(offset));
    let end = (Math.floor(offset / 512) + 1) * 512;
    while (end < limit && bit(sec(end)) === first) end += 512;
    end = Math.min(end, limit);
    if (!first) return { offset, length: end - offset, state: 'zero' };
    const ext: Extent = { offset, length: end - offset, state: 'data' };
    const f = this.file as FileNode;
    if (typeof f.fd === 'number') {
      ext.host = { fd: f.fd, offset: this.extentBase(idx) + 512 * this.bitmapBlocks + (offset - idx * es), writable: false, direct: f.direct };
    }
    return ext;
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    // honours the catalog and the sector bitmaps even for callers that skip blockStatus
    let done = 0;
    while (done < buf.length) {
      const off = offset + done;
      const ext = await this.blockStatus(off, buf.length - done);
      const dst = buf.subarray(done, done + ext.length);
      if (ext.state !== 'data') dst.fill(0);
      else {
        const idx = Math.floor(off / this.hdr.extentSize);
        await this.file.read(dst, this.extentBase(idx) + 512 * this.bitmapBlocks + (off - idx * this.hdr.extentSize));
      }
      done += ext.length;
    }
  }

  // qemu has no bdrv_get_info for this format: no dirty-flag
  async infoExtra(): Promise<Record<string, unknown>> { return { 'dirty-flag': null }; }
  async allocatedSize(): Promise<number> { return this.file.allocatedSize ? this.file.allocatedSize() : this.file.size; }
  async close(): Promise<void> { await this.file.close(); }
}

export async function openBochs(file: BlockNode): Promise<BochsNode> {
  const fsize = file.size;
  if (fsize < HEADER_SIZE) bad('file too short for a header');
  const h = Buffer.alloc(HEADER_SIZE);
  await file.read(h, 0);
  const hdr = parseBochsHeader(h);
  if (hdr.headerSize < HEADER_SIZE || hdr.headerSize > fsize) bad(`bad header size ${hdr.headerSize}`);
  if (hdr.catalogSize > MAX_CATALOG) bad('Catalog size is too large');
  if (hdr.extentSize < 512) bad('Extent size must be at least 512');
  if (hdr.extentSize & (hdr.extentSize - 1)) bad(`Extent size ${hdr.extentSize} is not a power of two`);
  if (hdr.extentSize > MAX_EXTENT) bad(`Extent size ${hdr.extentSize} is too large`);
  const sectorsPerExtent = hdr.extentSize / 512;
  if (hdr.bitmapSize === 0 || hdr.bitmapSize * 8 < sectorsPerExtent || hdr.bitmapSize > MAX_EXTENT) bad(`bad bitmap size ${hdr.bitmapSize}`);
  if (hdr.catalogSize < Math.ceil(Math.floor(hdr.diskSize / 512) / sectorsPerExtent)) bad('Catalog size is too small for this disk size');
  if (hdr.headerSize + hdr.catalogSize * 4 > fsize) bad('catalog extends beyond the end of the file');
  const raw = Buffer.alloc(hdr.catalogSize * 4);
  await file.read(raw, hdr.headerSize);
  const catalog = new Uint32Array(hdr.catalogSize);
  const node = new BochsNode(file, hdr, catalog);
  const extentBytes = 512 * (1 + Math.floor((hdr.bitmapSize - 1) / 512) + 1 + Math.floor((hdr.extentSize - 1) / 512));
  const seen = new Set<number>();
  for (let i = 0; i < hdr.catalogSize; i++) {
    const v = raw.readUInt32LE(i * 4);
    catalog[i] = v;
    if (v === UNALLOCATED) continue;
    if (seen.has(v)) bad(`extents ${i} and another share storage block ${v}`);
    seen.add(v);
    if (node.extentBase(i) + extentBytes > fsize) bad(`extent ${i} (block ${v}) lies beyond the end of the file`);
  }
  return node;
}

export const bochsDriver: FormatDriver = {
  name: 'bochs',
  readOnlyFormat: true,
  probe(head: Uint8Array): number {
    if (head.length < HEADER_SIZE) return 0;
    const h = Buffer.from(head.buffer, head.byteOffset, HEADER_SIZE);
    const v = h.readUInt32LE(64);
    return cstr(h, 0, 32) === MAGIC && cstr(h, 32, 16) === 'Redolog' && cstr(h, 48, 16) === 'Growing' && (v === V1 || v === V2) ? 100 : 0;
  },
  async open(file: BlockNode, ctx: OpenContext): Promise<BlockNode> {
    new OptionReader(ctx.options, 'bochs').finish();
    return openBochs(file);
  },
};
