// VDI (VirtualBox Disk Image) 1.1, as qemu reads and writes it: dynamic and static images with
// 1 MiB blocks and a block map; new blocks are appended in allocation order.
import crypto from 'node:crypto';
import { ImgError } from '../../core/errors';
import type {
  BlockNode, CheckResult, CreateContext, Extent, FormatDriver, MapInvalidator, OpenContext, Preallocation, WriteFlags,
} from '../../core/node';
import { OptionReader } from '../../core/options';
import { createFile, FileNode, withFileRw } from '../../protocols/file';
import { Mutex } from '../qcow2/util';

const SIGNATURE = 0xbeda107f;
const VERSION_1_1 = 0x00010001;
const SECTOR = 512;
const BLOCK = 1 << 20;
const UNALLOCATED = 0xffffffff;
const DISCARDED = 0xfffffffe;
const TYPE_DYNAMIC = 1;
const TYPE_STATIC = 2;
const HEADER_BYTES = 512;
const TEXT = '<<< QEMU VM Virtual Disk Image >>>\n';
/** qemu's VDI_BLOCKS_IN_IMAGE_MAX: the bmap stays below INT_MAX bytes */
const BLOCKS_MAX = 0x1fffff80;
/** our own bound on the block map we keep in memory (64 MiB: 16 TiB of disk) */
const BMAP_ENTRIES_MAX = 16 << 20;
const isAllocated = (e: number): boolean => e < DISCARDED;

export interface VdiHeader {
  raw: Buffer;
  version: number;
  headerSize: number;
  imageType: number;
  offsetBmap: number;
  offsetData: number;
  sectorSize: number;
  diskSize: number;
  blockSize: number;
  blockExtra: number;
  blocksInImage: number;
  blocksAllocated: number;
}

const bad = (msg: string): ImgError => new ImgError('image', `vdi: ${msg}`);

function parseHeader(b: Buffer): VdiHeader {
  if (b.length < HEADER_BYTES || b.readUInt32LE(0x40) !== SIGNATURE) throw new ImgError('image', 'Image not in VDI format (bad signature)');
  const ds = b.readBigUInt64LE(0x170);
  if (ds > BigInt(BLOCKS_MAX) * BigInt(BLOCK)) throw bad(`Unsupported VDI image size (size is 0x${ds.toString(16)})`);
  return {
    raw: b,
    version: b.readUInt32LE(0x44),
    headerSize: b.readUInt32LE(0x48),
    imageType: b.readUInt32LE(0x4c),
    offsetBmap: b.readUInt32LE(0x154),
    offsetData: b.readUInt32LE(0x158),
    sectorSize: b.readUInt32LE(0x168),
    diskSize: Number(ds),
    blockSize: b.readUInt32LE(0x178),
    blockExtra: b.readUInt32LE(0x17c),
    blocksInImage: b.readUInt32LE(0x180),
    blocksAllocated: b.readUInt32LE(0x184),
  };
}

function validate(h: VdiHeader, fileSize: number): void {
  const isNull = (at: number): boolean => h.raw.subarray(at, at + 16).every((x) => x === 0);
  if (h.version !== VERSION_1_1) throw bad(`unsupported VDI image (version ${h.version >>> 16}.${h.version & 0xffff})`);
  if (h.offsetBmap % SECTOR) throw bad(`unsupported VDI image (unaligned block map offset 0x${h.offsetBmap.toString(16)})`);
  if (h.offsetData % SECTOR) throw bad(`unsupported VDI image (unaligned data offset 0x${h.offsetData.toString(16)})`);
  if (h.sectorSize !== SECTOR) throw bad(`unsupported VDI image (sector size ${h.sectorSize} is not ${SECTOR})`);
  if (h.blockSize !== BLOCK) throw bad(`unsupported VDI image (block size ${h.blockSize} is not ${BLOCK})`);
  if (h.diskSize > h.blocksInImage * h.blockSize) {
    throw bad(`unsupported VDI image (disk size ${h.diskSize}, image bitmap has room for ${h.blocksInImage * h.blockSize})`);
  }
  if (!isNull(0x1a8)) throw bad('unsupported VDI image (non-NULL link UUID)');
  if (!isNull(0x1b8)) throw bad('unsupported VDI image (non-NULL parent UUID)');
  if (h.blocksInImage > BLOCKS_MAX) throw bad(`unsupported VDI image (too many blocks ${h.blocksInImage}, max is ${BLOCKS_MAX})`);
  if (h.blocksInImage > BMAP_ENTRIES_MAX) throw bad(`block map of ${h.blocksInImage} entries is larger than supported (${BMAP_ENTRIES_MAX})`);
  if (h.imageType !== TYPE_DYNAMIC && h.imageType !== TYPE_STATIC) throw bad(`unsupported image type ${h.imageType}`);
  if (h.offsetBmap < HEADER_BYTES || h.offsetBmap + h.blocksInImage * 4 > fileSize) throw bad('block map lies outside the file');
  if (h.offsetData < h.offsetBmap + h.blocksInImage * 4) throw bad('data area overlaps the block map');
  if (h.blocksAllocated > h.blocksInImage) throw bad(`${h.blocksAllocated} blocks allocated of ${h.blocksInImage}`);
}

export class VdiNode implements BlockNode {
  readonly driver = 'vdi';
  readonly align = 1;
  readonly backing = null;
  mapInvalidator: MapInvalidator | null = null;
  private mutex = new Mutex();
  private closed = false;
  private fd: number | null;
  readonly size: number;

  constructor(readonly file: BlockNode, public hdr: VdiHeader, public bmap: Buffer, public readOnly: boolean) {
    this.size = Math.ceil(hdr.diskSize / SECTOR) * SECTOR;
    this.fd = file instanceof FileNode ? file.fd : null;
  }

  get filename(): string { return this.file.filename; }

  private entry(i: number): number {
    const e = this.bmap.readUInt32LE(i * 4);
    if (isAllocated(e) && e >= this.hdr.blocksInImage) throw bad(`block map entry ${i} points to block ${e}, beyond ${this.hdr.blocksInImage}`);
    return e;
  }
  private host(e: number): number { return this.hdr.offsetData + e * BLOCK; }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    const bi = Math.floor(offset / BLOCK);
    const e = this.entry(bi);
    let len = Math.min(length, BLOCK - (offset % BLOCK));
    const alloc = isAllocated(e);
    for (let j = bi + 1; len < length; j++) {
      const n = this.entry(j);
      if (isAllocated(n) !== alloc || (alloc && n !== e + (j - bi))) break;
      len = Math.min(length, len + BLOCK);
    }
    if (!alloc) return { offset, length: len, state: 'zero' };
    const ext: Extent = { offset, length: len, state: 'data' };
    if (this.fd !== null) {
      ext.host = { fd: this.fd, offset: this.host(e) + (offset % BLOCK), writable: !this.readOnly, direct: (this.file as FileNode).direct };
    }
    return ext;
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const n = Math.min(BLOCK - (pos % BLOCK), buf.length - done);
      const e = this.entry(Math.floor(pos / BLOCK));
      const sub = buf.subarray(done, done + n);
      if (isAllocated(e)) await this.file.read(sub, this.host(e) + (pos % BLOCK));
      else sub.fill(0);
      done += n;
    }
  }

  async write(buf: Uint8Array, offset: number, _flags?: WriteFlags): Promise<void> {
    if (this.readOnly) throw new ImgError('readonly', 'vdi: the image is opened read-only');
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const n = Math.min(BLOCK - (pos % BLOCK), buf.length - done);
      const bi = Math.floor(pos / BLOCK);
      const chunk = buf.subarray(done, done + n);
      const e = this.entry(bi);
      if (isAllocated(e)) await this.file.write!(chunk, this.host(e) + (pos % BLOCK));
      else await this.mutex.run(() => this.allocate(bi, chunk, pos % BLOCK));
      done += n;
    }
  }

  private async allocate(bi: number, chunk: Uint8Array, inBlock: number): Promise<void> {
    const cur = this.entry(bi);
    if (isAllocated(cur)) { await this.file.write!(chunk, this.host(cur) + inBlock); return; }
    if (this.hdr.blocksAllocated >= this.hdr.blocksInImage) throw bad('no free block left in the image');
    this.mapInvalidator?.(bi * BLOCK, BLOCK);
    const e = this.hdr.blocksAllocated;
    const block = Buffer.alloc(BLOCK);
    block.set(chunk, inBlock);
    await this.file.write!(block, this.host(e));
    this.bmap.writeUInt32LE(e, bi * 4);
    this.hdr.blocksAllocated = e + 1;
    // block map sector, then the header
    const sec = Math.floor((bi * 4) / SECTOR) * SECTOR;
    await this.file.write!(this.bmap.subarray(sec, Math.min(this.bmap.length, sec + SECTOR)), this.hdr.offsetBmap + sec);
    await this.writeHeader();
  }

  private async writeHeader(): Promise<void> {
    this.hdr.raw.writeUInt32LE(this.hdr.blocksAllocated, 0x184);
    await this.file.write!(this.hdr.raw, 0);
  }

  async discard(offset: number, length: number): Promise<void> {
    // like qemu: VDI has no discard (blocks are never freed)
    void offset; void length;
  }

  async flush(): Promise<void> { if (!this.readOnly) await this.file.flush?.(); }

  async truncate(_size: number, _prealloc?: Preallocation): Promise<void> {
    throw new ImgError('unsupported', 'vdi: resizing is not supported');
  }

  async allocatedSize(): Promise<number> {
    return this.file.allocatedSize ? this.file.allocatedSize() : this.file.size;
  }

  async infoExtra(): Promise<Record<string, unknown>> {
    return { 'cluster-size': BLOCK, 'dirty-flag': false };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      if (!this.readOnly) await this.flush();
    } finally {
      await this.file.close();
    }
  }

  check(): CheckResult {
    const res: CheckResult = { checkErrors: 0, corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, messages: [] };
    const n = this.hdr.blocksInImage;
    const owner = new Int32Array(n).fill(-1);
    let allocated = 0;
    for (let b = 0; b < n; b++) {
      const e = this.bmap.readUInt32LE(b * 4);
      if (!isAllocated(e)) continue;
      if (e < n) {
        allocated++;
        if (owner[e] < 0) owner[e] = b;
        else { res.messages.push(`ERROR: block index ${owner[e]} also used by ${b}`); res.corruptions++; }
      } else {
        res.messages.push(`ERROR: block index ${b} too large, is ${e}`);
        res.corruptions++;
      }
    }
    if (allocated !== this.hdr.blocksAllocated) {
      res.messages.push(`ERROR: allocated blocks mismatch, is ${allocated}, should be ${this.hdr.blocksAllocated}`);
      res.corruptions++;
    }
    return res;
  }
}

async function openVdi(file: BlockNode, ctx: OpenContext): Promise<VdiNode> {
  const r = new OptionReader(ctx.options, 'vdi');
  r.finish();
  if (file.size < HEADER_BYTES) throw new ImgError('image', 'Image not in VDI format (file too short)');
  const hb = Buffer.alloc(HEADER_BYTES);
  await file.read(hb, 0);
  const h = parseHeader(hb);
  validate(h, file.size);
  const bmap = Buffer.alloc(h.blocksInImage * 4);
  await file.read(bmap, h.offsetBmap);
  // the backing option is accepted and ignored as for any format without backing files
  await ctx.openBacking(null, null);
  return new VdiNode(file, h, bmap, ctx.readOnly);
}

async function createVdi(ctx: CreateContext): Promise<void> {
  const r = new OptionReader(ctx.options, 'vdi');
  r.markUsed('size');
  const isStatic = r.bool('static', false);
  // qemu-img create hands -o preallocation to the file protocol, which creates the file empty:
  // off/falloc/full have no visible effect, metadata is refused (static=on is VDI's metadata
  // preallocation)
  const pv = r.str('preallocation') ?? 'off';
  if (!['off', 'falloc', 'full'].includes(pv)) throw new ImgError('usage', `Unsupported preallocation mode: ${pv}`);
  r.bool('nocow', false);
  r.int('extent_size_hint', 0);
  r.finish();
  if (ctx.size === null) throw new ImgError('usage', 'vdi: image size required');
  const size = Math.ceil(ctx.size / SECTOR) * SECTOR;
  if (size > BLOCKS_MAX * BLOCK) throw new ImgError('usage', `Unsupported VDI image size (size is 0x${size.toString(16)}, max supported is 0x${(BLOCKS_MAX * BLOCK).toString(16)})`);
  const blocks = Math.ceil(size / BLOCK);
  if (blocks > BMAP_ENTRIES_MAX) throw new ImgError('usage', 'vdi: image too large');
  const bmapSize = Math.ceil((blocks * 4) / SECTOR) * SECTOR;
  const h = Buffer.alloc(HEADER_BYTES);
  h.write(TEXT, 0, 'latin1');
  h.writeUInt32LE(SIGNATURE, 0x40);
  h.writeUInt32LE(VERSION_1_1, 0x44);
  h.writeUInt32LE(0x180, 0x48);
  h.writeUInt32LE(isStatic ? TYPE_STATIC : TYPE_DYNAMIC, 0x4c);
  h.writeUInt32LE(0x200, 0x154);
  h.writeUInt32LE(0x200 + bmapSize, 0x158);
  h.writeUInt32LE(SECTOR, 0x168);
  h.writeBigUInt64LE(BigInt(size), 0x170);
  h.writeUInt32LE(BLOCK, 0x178);
  h.writeUInt32LE(blocks, 0x180);
  h.writeUInt32LE(isStatic ? blocks : 0, 0x184);
  const uuid = (): Buffer => { const u = crypto.randomBytes(16); u[6] = (u[6] & 0x0f) | 0x40; u[8] = (u[8] & 0x3f) | 0x80; return u; };
  uuid().copy(h, 0x188);
  uuid().copy(h, 0x198);
  const bmap = Buffer.alloc(bmapSize);
  for (let i = 0; i < blocks; i++) bmap.writeUInt32LE(isStatic ? i : UNALLOCATED, i * 4);
  await createFile(ctx.filename, 0, 'off');
  await withFileRw(ctx.filename, async (f) => {
    await f.write(h, 0);
    await f.write(bmap, 0x200);
    if (isStatic) await f.truncate(0x200 + bmapSize + blocks * BLOCK);
  });
}

export const vdiDriver: FormatDriver = {
  name: 'vdi',
  probe(head: Uint8Array): number {
    if (head.length < HEADER_BYTES) return 0;
    return Buffer.from(head.buffer, head.byteOffset, head.length).readUInt32LE(0x40) === SIGNATURE ? 100 : 0;
  },
  createOptions: ['size', 'static', 'preallocation', 'nocow', 'extent_size_hint'],
  open: openVdi,
  create: createVdi,
  async check(file, ctx, repair) {
    if (repair !== 'none') {
      // qemu's vdi check refuses to repair (ENOTSUP): qemu-img reports no check support, exit 63
      throw Object.assign(new ImgError('unsupported', 'vdi: repairing is not supported'), { noCheck: true });
    }
    const node = await openVdi(file, { ...ctx, openBacking: async () => null });
    return node.check();
  },
};
