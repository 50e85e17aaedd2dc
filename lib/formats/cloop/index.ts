// cloop (compressed loop, Knoppix), read-only: a 128-byte shell-script header ("#V2.0 Format"),
// the block size and block count (big-endian), n+1 big-endian offsets, then zlib blocks.
import zlib from 'node:zlib';
import { ImgError } from '../../core/errors';
import type { BlockNode, Extent, FormatDriver, OpenContext } from '../../core/node';
import { OptionReader } from '../../core/options';
import { ChunkCache } from '../dmg/cache';

/** how far ahead of a sequential reader blocks are decompressed */
const READAHEAD = 1 << 20;

const HEADER = 128;
export const CLOOP_MAGIC = '#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n';
/** qemu's cap on the block size (it needs a buffer this big) */
const MAX_BLOCK_SIZE = 64 * 1024 * 1024;
/** qemu's cap on the offsets table */
const MAX_OFFSETS_BYTES = 512 * 1024 * 1024;
const CACHE_BYTES = 32 * 1024 * 1024;

function bad(msg: string): never { throw new ImgError('image', `cloop: ${msg}`); }

export class CloopNode implements BlockNode {
  readonly driver = 'cloop';
  readonly readOnly = true;
  readonly align = 1;
  readonly backing = null;
  mapInvalidator = null;
  readonly size: number;
  private cache: ChunkCache;

  constructor(readonly file: BlockNode, readonly blockSize: number, private offsets: Float64Array) {
    this.size = (offsets.length - 1) * blockSize;
    this.cache = new ChunkCache(Math.max(CACHE_BYTES, 2 * blockSize));
  }
  get filename(): string { return this.file.filename; }
  get blockCount(): number { return this.offsets.length - 1; }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    return { offset, length: Math.min(length, this.size - offset), state: 'data' };
  }

  private nextSequential = -1;

  async read(buf: Uint8Array, offset: number): Promise<void> {
    const first = Math.floor(offset / this.blockSize);
    const last = Math.floor((offset + buf.length - 1) / this.blockSize);
    // every block of the request decompresses at once (libuv's pool), and a sequential reader
    // gets the next 1 MiB decompressed ahead of it
    if (first === this.nextSequential || first === this.nextSequential - 1) {
      const ahead = Math.max(1, Math.ceil(READAHEAD / this.blockSize));
      const keys: number[] = [];
      for (let b = last + 1; b <= Math.min(this.blockCount - 1, last + ahead); b++) keys.push(b);
      this.cache.prefetch(keys, (b) => this.load(b), 2 * ahead + 8);
    }
    this.nextSequential = last + 1;
    for (let b0 = first; b0 <= last; b0 += 64) {
      const b1 = Math.min(last, b0 + 63);
      const blocks = await Promise.all(Array.from({ length: b1 - b0 + 1 }, (_, k) => this.cache.get(b0 + k, () => this.load(b0 + k))));
      blocks.forEach((data, k) => {
        const bStart = (b0 + k) * this.blockSize;
        const from = Math.max(offset, bStart);
        const to = Math.min(offset + buf.length, bStart + this.blockSize);
        buf.set(data.subarray(from - bStart, to - bStart), from - offset);
      });
    }
  }

  private async load(bi: number): Promise<Buffer> {
    const start = this.offsets[bi];
    const len = this.offsets[bi + 1] - start;
    const src = Buffer.alloc(len);
    await this.file.read(src, start);
    let out: Buffer;
    try {
      out = await new Promise<Buffer>((resolve, reject) => {
        zlib.inflate(src, { maxOutputLength: this.blockSize + 1, chunkSize: this.blockSize + 1 } as zlib.ZlibOptions, (e, r) => (e ? reject(e) : resolve(r)));
      });
    } catch (e) {
      return bad(`block ${bi} does not decompress: ${(e as Error).message.split('\n')[0]}`);
    }
    if (out.length !== this.blockSize) bad(`block ${bi} decompressed to ${out.length} bytes, expected ${this.blockSize}`);
    return out;
  }

  // qemu has no bdrv_get_info for this format: no dirty-flag
  async infoExtra(): Promise<Record<string, unknown>> { return { 'dirty-flag': null }; }
  async allocatedSize(): Promise<number> { return this.file.allocatedSize ? this.file.allocatedSize() : this.file.size; }
  async close(): Promise<void> {
    this.cache.clear();
    await this.file.close();
  }
}

export async function openCloop(file: BlockNode): Promise<CloopNode> {
  const fsize = file.size;
  if (fsize < HEADER + 8) bad(`file too short for a header (${fsize} bytes)`);
  const h = Buffer.alloc(HEADER + 8);
  await file.read(h, 0);
  const text = h.toString('latin1', 0, HEADER);
  if (!text.startsWith('#!/bin/sh') || !text.includes('#V2.0 Format')) bad('not a V2.0 cloop image (header text missing)');
  const blockSize = h.readUInt32BE(HEADER);
  const n = h.readUInt32BE(HEADER + 4);
  if (blockSize === 0) bad('block_size cannot be zero');
  if (blockSize % 512) bad(`block_size ${blockSize} must be a multiple of 512`);
  if (blockSize > MAX_BLOCK_SIZE) bad(`block_size ${blockSize} must be ${MAX_BLOCK_SIZE / 1048576} MB or less`);
  const tableBytes = (n + 1) * 8;
  if (tableBytes > MAX_OFFSETS_BYTES) bad('image requires too many offsets');
  const tableEnd = HEADER + 8 + tableBytes;
  if (tableEnd > fsize) bad(`offsets table (${n + 1} entries) extends beyond the end of the file`);
  const t = Buffer.alloc(tableBytes);
  await file.read(t, HEADER + 8);
  const offsets = new Float64Array(n + 1);
  // a zlib stream of one block is never larger than this (stored blocks plus framing)
  const maxCompressed = blockSize + Math.ceil(blockSize / 16000) * 5 + 64;
  for (let i = 0; i <= n; i++) {
    const v = t.readBigUInt64BE(i * 8);
    if (v > BigInt(fsize)) bad(`offset ${i} (${v}) is beyond the end of the file`);
    offsets[i] = Number(v);
    if (i === 0) {
      if (offsets[0] < tableEnd) bad('first block overlaps the offsets table');
      continue;
    }
    if (offsets[i] < offsets[i - 1]) bad(`offsets not monotonically increasing at index ${i}, image file is corrupt`);
    const size = offsets[i] - offsets[i - 1];
    if (size > maxCompressed) bad(`invalid compressed block size ${size} at index ${i}, image file is corrupt`);
  }
  return new CloopNode(file, blockSize, offsets);
}

export const cloopDriver: FormatDriver = {
  name: 'cloop',
  readOnlyFormat: true,
  probe(head: Uint8Array): number {
    // the whole magic must be there (qemu's cloop_probe): a short or empty file is not cloop
    if (head.length < CLOOP_MAGIC.length) return 0;
    return Buffer.from(head.buffer, head.byteOffset, CLOOP_MAGIC.length).toString('latin1') === CLOOP_MAGIC ? 2 : 0;
  },
  async open(file: BlockNode, ctx: OpenContext): Promise<BlockNode> {
    new OptionReader(ctx.options, 'cloop').finish();
    return openCloop(file);
  },
};
