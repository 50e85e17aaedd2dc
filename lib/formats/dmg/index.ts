// dmg (Apple UDIF), read-only: the koly trailer at the end of the file, the XML property list
// (or the old binary resource fork) holding one mish block table per partition, and chunks
// that are zero, raw, or compressed (zlib, bzip2, ADC, LZFSE, LZMA).
import zlib from 'node:zlib';
import { ImgError } from '../../core/errors';
import type { BlockNode, Extent, FormatDriver, OpenContext } from '../../core/node';
import { OptionReader } from '../../core/options';
import type { FileNode } from '../../protocols/file';
import { ChunkCache } from './cache';
import { blkxData, parsePlist } from './plist';
import { adcDecompress } from './adc';
import { bzip2Decompress } from './bzip2';
import { lzfseDecompress } from './lzfse';

const SECTOR = 512;
const KOLY_SIZE = 512;
/** as qemu: chunks may not decompress to more than 64 MiB nor be stored in more */
const MAX_CHUNK_BYTES = 64 * 1024 * 1024;
const MAX_CHUNK_SECTORS = MAX_CHUNK_BYTES / SECTOR;
const MAX_XML = 16 * 1024 * 1024;
const MAX_CHUNKS = 4 * 1024 * 1024;
const CACHE_BYTES = 64 * 1024 * 1024;

export const enum ChunkType {
  Zero = 0x0, Raw = 0x1, Ignore = 0x2, Adc = 0x80000004, Zlib = 0x80000005, Bzip2 = 0x80000006,
  Lzfse = 0x80000007, Lzma = 0x80000008, Comment = 0x7ffffffe, Terminator = 0xffffffff,
}

export interface Chunk {
  type: number;
  /** guest byte offset and length */
  start: number;
  length: number;
  /** host byte offset and stored length */
  hostOffset: number;
  hostLength: number;
}

const TYPE_NAMES: Record<number, string> = {
  [ChunkType.Adc]: 'ADC', [ChunkType.Zlib]: 'zlib', [ChunkType.Bzip2]: 'bzip2', [ChunkType.Lzfse]: 'LZFSE', [ChunkType.Lzma]: 'LZMA',
};

function bad(msg: string): never { throw new ImgError('image', `dmg: ${msg}`); }

function u64(b: Buffer, at: number, what: string): number {
  const v = b.readBigUInt64BE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) bad(`${what} is out of range`);
  return Number(v);
}

export interface Koly {
  offset: number;
  dataForkOffset: number;
  dataForkLength: number;
  rsrcForkOffset: number;
  rsrcForkLength: number;
  xmlOffset: number;
  xmlLength: number;
  sectorCount: number;
  version: number;
  imageVariant: number;
}

/** Finds and parses the koly trailer: the last 512 bytes (qemu also accepts it up to 511
 *  bytes earlier, for files padded to a sector multiple). */
export function parseKoly(tail: Buffer, tailOffset: number, fileSize: number): Koly {
  let at = -1;
  for (let i = tail.length - KOLY_SIZE; i >= 0 && i >= tail.length - KOLY_SIZE - 511; i--) {
    if (tail.readUInt32BE(i) === 0x6b6f6c79) { at = i; break; }
  }
  if (at < 0) bad('could not locate the UDIF trailer (koly) at the end of the file');
  const k = tail.subarray(at, at + KOLY_SIZE);
  const offset = tailOffset + at;
  const koly: Koly = {
    offset,
    version: k.readUInt32BE(4),
    dataForkOffset: u64(k, 0x18, 'data fork offset'),
    dataForkLength: u64(k, 0x20, 'data fork length'),
    rsrcForkOffset: u64(k, 0x28, 'resource fork offset'),
    rsrcForkLength: u64(k, 0x30, 'resource fork length'),
    xmlOffset: u64(k, 0xd8, 'XML offset'),
    xmlLength: u64(k, 0xe0, 'XML length'),
    imageVariant: k.readUInt32BE(0x1e8),
    sectorCount: u64(k, 0x1ec, 'sector count'),
  };
  if (k.readUInt32BE(8) !== KOLY_SIZE) bad(`unexpected trailer size ${k.readUInt32BE(8)}`);
  if (koly.dataForkOffset > offset || koly.dataForkLength > offset - koly.dataForkOffset) bad('data fork lies outside the file');
  if (koly.rsrcForkLength && (koly.rsrcForkOffset >= offset || koly.rsrcForkLength > offset - koly.rsrcForkOffset)) bad('resource fork lies outside the file');
  if (koly.xmlLength && (koly.xmlOffset >= offset || koly.xmlLength > offset - koly.xmlOffset)) bad('property list lies outside the file');
  if (koly.sectorCount > Number.MAX_SAFE_INTEGER / SECTOR) bad('sector count is out of range');
  void fileSize;
  return koly;
}

/** Parses one mish block table; chunk offsets are made absolute. */
export function parseMish(b: Buffer, koly: Koly, out: Chunk[]): void {
  if (b.length < 204 || b.readUInt32BE(0) !== 0x6d697368) return; // not a block table: skipped, as qemu
  const firstSector = u64(b, 8, 'mish first sector');
  const dataOffset = u64(b, 0x18, 'mish data offset');
  const n = b.readUInt32BE(200);
  if (204 + n * 40 > b.length) bad(`block table declares ${n} chunks but holds ${Math.floor((b.length - 204) / 40)}`);
  if (out.length + n > MAX_CHUNKS) bad('too many chunks');
  for (let i = 0; i < n; i++) {
    const o = 204 + i * 40;
    const type = b.readUInt32BE(o);
    if (type === ChunkType.Comment || type === ChunkType.Terminator) continue;
    const sec = u64(b, o + 8, 'chunk sector');
    const count = u64(b, o + 16, 'chunk sector count');
    const cOff = u64(b, o + 24, 'chunk offset');
    const cLen = u64(b, o + 32, 'chunk length');
    const known = type === ChunkType.Zero || type === ChunkType.Raw || type === ChunkType.Ignore || TYPE_NAMES[type] !== undefined;
    if (!known) bad(`chunk ${i} has unknown type 0x${type.toString(16)}`);
    if (count === 0) continue;
    const zero = type === ChunkType.Zero || type === ChunkType.Ignore;
    if (!zero && count > MAX_CHUNK_SECTORS) bad(`sector count ${count} for chunk ${i} is larger than max (${MAX_CHUNK_SECTORS})`);
    if (!zero && cLen > MAX_CHUNK_BYTES) bad(`length ${cLen} for chunk ${i} is larger than max (${MAX_CHUNK_BYTES})`);
    const start = firstSector + sec;
    if (start > Number.MAX_SAFE_INTEGER / SECTOR || start + count > koly.sectorCount) {
      bad(`chunk ${i} (sectors ${start}+${count}) lies beyond the disk (${koly.sectorCount} sectors)`);
    }
    const hostOffset = koly.dataForkOffset + dataOffset + cOff;
    if (!zero) {
      if (hostOffset > koly.offset || cLen > koly.offset - hostOffset) bad(`chunk ${i} data lies outside the data fork`);
      if (type === ChunkType.Raw && cLen !== count * SECTOR) bad(`raw chunk ${i} stores ${cLen} bytes for ${count} sectors`);
    }
    out.push({ type, start: start * SECTOR, length: count * SECTOR, hostOffset, hostLength: zero ? 0 : cLen });
  }
}

/** The old binary resource fork: a header, then resources each prefixed by their length. */
function parseRsrc(b: Buffer, koly: Koly, out: Chunk[]): void {
  if (b.length < 16) bad('resource fork too short');
  const dataOff = b.readUInt32BE(0);
  const dataLen = b.readUInt32BE(8);
  if (dataOff > b.length || dataLen === 0 || dataLen > b.length - dataOff) bad('bad resource fork header');
  let o = dataOff;
  const end = dataOff + dataLen;
  while (o < end) {
    if (end - o < 4) bad('truncated resource');
    const len = b.readUInt32BE(o);
    o += 4;
    if (len === 0 || len > end - o) bad('bad resource length');
    parseMish(b.subarray(o, o + len), koly, out);
    o += len;
  }
}

async function readExact(file: BlockNode, offset: number, length: number): Promise<Buffer> {
  if (offset + length > file.size) bad(`read of ${length} bytes at ${offset} is beyond the end of the file`);
  const b = Buffer.alloc(length);
  await file.read(b, offset);
  return b;
}

// One output chunk of the whole expected size: with zlib's default 16 KiB chunks every piece
// makes a round trip to the JavaScript thread and the pieces are concatenated afterwards.
function decompressOptions(len: number): zlib.ZlibOptions {
  return { maxOutputLength: Math.max(1, len + 1), chunkSize: Math.max(64, Math.min(len + 1, 64 << 20)) } as zlib.ZlibOptions;
}

const READAHEAD_BYTES = 2 << 20;

function inflate(src: Buffer, outLen: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    zlib.inflate(src, decompressOptions(outLen), (err, res) => (err ? reject(err) : resolve(res)));
  });
}

export class DmgNode implements BlockNode {
  readonly driver = 'dmg';
  readonly readOnly = true;
  readonly align = 1;
  readonly backing = null;
  mapInvalidator = null;
  private cache = new ChunkCache(CACHE_BYTES);

  constructor(readonly file: BlockNode, readonly size: number, readonly chunks: Chunk[]) {}

  get filename(): string { return this.file.filename; }

  /** index of the chunk containing `off`, or -(insertion point)-1 */
  private find(off: number): number {
    let lo = 0, hi = this.chunks.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const c = this.chunks[mid];
      if (off < c.start) hi = mid - 1;
      else if (off >= c.start + c.length) lo = mid + 1;
      else return mid;
    }
    return -lo - 1;
  }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    const i = this.find(offset);
    if (i < 0) {
      const next = -i - 1;
      const end = next < this.chunks.length ? this.chunks[next].start : this.size;
      return { offset, length: Math.min(length, end - offset), state: 'zero' };
    }
    const c = this.chunks[i];
    const zero = c.type === ChunkType.Zero || c.type === ChunkType.Ignore;
    let end = c.start + c.length;
    if (c.type === ChunkType.Raw) {
      // merge host-contiguous raw neighbours
      for (let j = i + 1; j < this.chunks.length && end < offset + length; j++) {
        const d = this.chunks[j];
        if (d.type !== ChunkType.Raw || d.start !== end || d.hostOffset !== c.hostOffset + (d.start - c.start)) break;
        end = d.start + d.length;
      }
      const f = this.file as FileNode;
      const len = Math.min(length, end - offset);
      const ext: Extent = { offset, length: len, state: 'data' };
      if (typeof f.fd === 'number') ext.host = { fd: f.fd, offset: c.hostOffset + (offset - c.start), writable: false, direct: f.direct };
      return ext;
    }
    for (let j = i + 1; j < this.chunks.length && end < offset + length; j++) {
      const d = this.chunks[j];
      const dz = d.type === ChunkType.Zero || d.type === ChunkType.Ignore;
      if (d.start !== end || dz !== zero || d.type === ChunkType.Raw) break;
      end = d.start + d.length;
    }
    return { offset, length: Math.min(length, end - offset), state: zero ? 'zero' : 'data' };
  }

  private nextSequential = -1;

  /** a sequential reader gets the next compressed chunks (up to ~2 MiB) decompressed ahead */
  private readAhead(from: number): void {
    const keys: number[] = [];
    let bytes = 0;
    for (let k = from; k < this.chunks.length && bytes < READAHEAD_BYTES && keys.length < 16; k++) {
      const c = this.chunks[k];
      if (c.type === ChunkType.Zero || c.type === ChunkType.Ignore || c.type === ChunkType.Raw) continue;
      keys.push(k);
      bytes += c.length;
    }
    this.cache.prefetch(keys, (k) => this.decompress(this.chunks[k]), 8);
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const off = offset + done;
      const i = this.find(off);
      if (i < 0) {
        const next = -i - 1;
        const end = next < this.chunks.length ? this.chunks[next].start : this.size;
        const n = Math.min(buf.length - done, end - off);
        buf.fill(0, done, done + n);
        done += n;
        continue;
      }
      const c = this.chunks[i];
      const n = Math.min(buf.length - done, c.start + c.length - off);
      const dst = buf.subarray(done, done + n);
      if (c.type === ChunkType.Zero || c.type === ChunkType.Ignore) dst.fill(0);
      else if (c.type === ChunkType.Raw) await this.file.read(dst, c.hostOffset + (off - c.start));
      else {
        if (i === this.nextSequential) this.readAhead(i + 1);
        this.nextSequential = i + 1;
        const data = await this.cache.get(i, () => this.decompress(c));
        dst.set(data.subarray(off - c.start, off - c.start + n));
      }
      done += n;
    }
  }

  private async decompress(c: Chunk): Promise<Buffer> {
    const src = await readExact(this.file, c.hostOffset, c.hostLength);
    const name = TYPE_NAMES[c.type] ?? `0x${c.type.toString(16)}`;
    let out: Buffer;
    try {
      switch (c.type) {
        case ChunkType.Zlib: out = await inflate(src, c.length); break;
        case ChunkType.Adc: out = adcDecompress(src, c.length); break;
        case ChunkType.Bzip2: out = bzip2Decompress(src, c.length); break;
        case ChunkType.Lzfse: out = lzfseDecompress(src, c.length); break;
        case ChunkType.Lzma: {
          const { lzmaDecompress } = await import('./lzma');
          out = lzmaDecompress(src, c.length);
          break;
        }
        default: return bad(`chunk type 0x${c.type.toString(16)} cannot be read`);
      }
    } catch (e) {
      if (e instanceof ImgError) throw e;
      return bad(`${name} chunk at guest offset ${c.start}: ${(e as Error).message.split('\n')[0]}`);
    }
    if (out.length !== c.length) bad(`${name} chunk at guest offset ${c.start} decompressed to ${out.length} bytes, expected ${c.length}`);
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

export const ENCRYPTED_MSG = 'encrypted dmg images are not supported';

export async function openDmg(file: BlockNode): Promise<DmgNode> {
  const fileSize = file.size;
  if (fileSize < KOLY_SIZE) bad('dmg file must be at least 512 bytes long');
  const head = await readExact(file, 0, Math.min(8, fileSize));
  const tailLen = Math.min(fileSize, KOLY_SIZE + 511);
  const tail = await readExact(file, fileSize - tailLen, tailLen);
  if (head.toString('latin1', 0, 8) === 'encrcdsa' || tail.toString('latin1', tail.length - 8) === 'cdsaencr') {
    throw new ImgError('unsupported', ENCRYPTED_MSG);
  }
  const koly = parseKoly(tail, fileSize - tailLen, fileSize);
  const chunks: Chunk[] = [];
  if (koly.xmlLength) {
    if (koly.xmlLength > MAX_XML) bad(`property list of ${koly.xmlLength} bytes is larger than max (${MAX_XML})`);
    const xml = await readExact(file, koly.xmlOffset, koly.xmlLength);
    for (const d of blkxData(parsePlist(xml.toString('utf8')))) parseMish(d, koly, chunks);
  } else if (koly.rsrcForkLength) {
    if (koly.rsrcForkLength > MAX_XML) bad(`resource fork of ${koly.rsrcForkLength} bytes is larger than max (${MAX_XML})`);
    parseRsrc(await readExact(file, koly.rsrcForkOffset, koly.rsrcForkLength), koly, chunks);
  } else bad('no block tables (neither property list nor resource fork)');
  chunks.sort((a, b) => a.start - b.start);
  for (let i = 1; i < chunks.length; i++) {
    const p = chunks[i - 1];
    if (chunks[i].start < p.start + p.length) bad(`chunks overlap at guest offset ${chunks[i].start}`);
  }
  return new DmgNode(file, koly.sectorCount * SECTOR, chunks);
}

export const dmgDriver: FormatDriver = {
  name: 'dmg',
  readOnlyFormat: true,
  // as qemu: by the file name; probeTail below recognises the trailer itself
  probe: (_head, filename) => (filename.toLowerCase().endsWith('.dmg') ? 2 : 0),
  async open(file: BlockNode, ctx: OpenContext): Promise<BlockNode> {
    const r = new OptionReader(ctx.options, 'dmg');
    r.finish();
    return openDmg(file);
  },
};

/** score for the last bytes of a file (at least 1023, or the whole file): a koly trailer with
 *  its fixed version and size fields */
export function probeTail(tail: Uint8Array, fileSize: number): number {
  const b = Buffer.from(tail.buffer, tail.byteOffset, tail.length);
  if (b.length < KOLY_SIZE || fileSize < KOLY_SIZE) return 0;
  const at = b.length - KOLY_SIZE;
  if (b.readUInt32BE(at) === 0x6b6f6c79 && b.readUInt32BE(at + 4) === 4 && b.readUInt32BE(at + 8) === KOLY_SIZE) return 50;
  return 0;
}
(dmgDriver as FormatDriver & { probeTail?: typeof probeTail }).probeTail = probeTail;
