// qcow (version 1): two-level tables, clusters appended at the end of the file, zlib-compressed
// clusters (read; rewritten uncompressed when written), backing files. No refcounts, no check
// (qemu-img has none for qcow). AES-encrypted images (crypt_method 1) via lib/crypto/legacy.ts.
import zlib from 'node:zlib';
import { ImgError } from '../../core/errors';
import { readBacking } from '../../core/io';
import type { BlockNode, CreateContext, Extent, FormatDriver, MapInvalidator, OpenContext, Preallocation, WriteFlags } from '../../core/node';
import { OptionReader } from '../../core/options';
import { createFile, FileNode, withFileRw } from '../../protocols/file';
import { Mutex } from '../qcow2/util';
import { PageCache } from '../qed/pagecache';
import { fullBackingName } from '../qcow2/node';
import { legacyAesCreate, openLegacyAes } from '../../crypto/legacy';
import type { SectorCipher } from '../../crypto/modes';

const MAGIC = 0x514649fb;
const HEADER_LEN = 48;
const OFLAG_COMPRESSED = 1n << 63n;
const MAX_L1_BYTES = 64 << 20;
const CACHE_BYTES = 16 << 20;
const MAX_BATCH = 16 << 20;
const INT_MAX = 0x7fffffff;

export interface QcowHeader {
  backingOffset: number;
  backingSize: number;
  mtime: number;
  size: number;
  clusterBits: number;
  l2Bits: number;
  cryptMethod: number;
  l1Offset: number;
}

const bad = (msg: string): ImgError => new ImgError('image', `qcow: ${msg}`);

function u64(b: Buffer, at: number, what: string): number {
  const v = b.readBigUInt64BE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw bad(`${what} is out of range`);
  return Number(v);
}

export function serializeHeader(h: QcowHeader): Buffer {
  const b = Buffer.alloc(HEADER_LEN);
  b.writeUInt32BE(MAGIC, 0);
  b.writeUInt32BE(1, 4);
  b.writeBigUInt64BE(BigInt(h.backingOffset), 8);
  b.writeUInt32BE(h.backingSize, 16);
  b.writeUInt32BE(h.mtime, 20);
  b.writeBigUInt64BE(BigInt(h.size), 24);
  b.writeUInt8(h.clusterBits, 32);
  b.writeUInt8(h.l2Bits, 33);
  b.writeUInt32BE(h.cryptMethod, 36);
  b.writeBigUInt64BE(BigInt(h.l1Offset), 40);
  return b;
}

interface Lookup { kind: 'data' | 'compressed' | 'unalloc'; host: number; csize: number }

export class QcowNode implements BlockNode {
  readonly driver = 'qcow';
  readonly align: number;
  /** legacy AES (crypt_method 1): data clusters pass through here, IVs by guest sector */
  crypto: SectorCipher | null = null;
  mapInvalidator: MapInvalidator | null = null;
  readonly cs: number;
  readonly l2Entries: number;
  readonly l2Bytes: number;
  readonly size: number;
  private fileEnd: number;
  private cache = new PageCache(CACHE_BYTES);
  private mutex = new Mutex();
  private closed = false;
  private fd: number | null;
  private lastComp: { host: number; data: Buffer } | null = null;

  constructor(readonly file: BlockNode, readonly hdr: QcowHeader, readonly l1: Buffer, readonly readOnly: boolean,
    readonly backing: BlockNode | null, readonly backingName: string | null) {
    this.cs = 2 ** hdr.clusterBits;
    this.l2Entries = 2 ** hdr.l2Bits;
    this.l2Bytes = this.l2Entries * 8;
    this.size = Math.floor(hdr.size / 512) * 512;
    this.fileEnd = file.size;
    this.fd = file instanceof FileNode ? file.fd : null;
    this.align = hdr.cryptMethod ? 512 : 1;
  }

  get filename(): string { return this.file.filename; }

  private l1Entry(i: number): number {
    if (i * 8 >= this.l1.length) return 0;
    const v = this.l1.readBigUInt64BE(i * 8);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw bad(`L1 entry ${i} is out of range`);
    return Number(v);
  }

  private async l2(off: number): Promise<Buffer> {
    if (off + this.l2Bytes > this.fileEnd) throw bad(`L2 table offset 0x${off.toString(16)} lies past the end of the file`);
    return this.cache.load(off, this.l2Bytes, (b, o) => this.file.read(b, o));
  }

  async lookup(pos: number): Promise<Lookup> {
    const ci = Math.floor(pos / this.cs);
    const l2off = this.l1Entry(Math.floor(ci / this.l2Entries));
    if (!l2off) return { kind: 'unalloc', host: 0, csize: 0 };
    const t = await this.l2(l2off);
    const e = t.readBigUInt64BE((ci % this.l2Entries) * 8);
    if (e === 0n) return { kind: 'unalloc', host: 0, csize: 0 };
    if (e & OFLAG_COMPRESSED) {
      const shift = BigInt(63 - this.hdr.clusterBits);
      const host = Number(e & ((1n << shift) - 1n));
      const csize = Number((e >> shift) & BigInt(this.cs - 1));
      if (host + csize > this.fileEnd || csize === 0) throw bad(`compressed cluster at 0x${host.toString(16)} lies past the end of the file`);
      return { kind: 'compressed', host, csize };
    }
    if (e > BigInt(Number.MAX_SAFE_INTEGER) || Number(e) >= this.fileEnd) throw bad(`cluster offset 0x${e.toString(16)} lies past the end of the file`);
    return { kind: 'data', host: Number(e), csize: 0 };
  }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    const first = await this.lookup(offset);
    const inC = offset % this.cs;
    // a missing L2 table stands for the whole span of its L1 entry
    const span = this.cs * this.l2Entries;
    const step = (p: number): number => (this.l1Entry(Math.floor(p / span)) ? this.cs - (p % this.cs) : span - (p % span));
    let len = Math.min(length, first.kind === 'unalloc' ? step(offset) : this.cs - inC);
    if (first.kind !== 'compressed') {
      for (let k = 0; len < length && k < 16384; k++) {
        const n = await this.lookup(offset + len);
        if (n.kind !== first.kind || (n.kind === 'data' && n.host !== first.host + inC + len)) break;
        len = Math.min(length, len + (n.kind === 'unalloc' ? step(offset + len) : this.cs));
      }
    }
    const ext: Extent = { offset, length: len, state: first.kind === 'unalloc' ? 'unallocated' : 'data' };
    if (first.kind === 'data' && this.fd !== null && !this.crypto) {
      ext.host = { fd: this.fd, offset: first.host + inC, writable: !this.readOnly, direct: (this.file as FileNode).direct };
    }
    return ext;
  }

  private async decompress(l: Lookup): Promise<Buffer> {
    if (this.lastComp && this.lastComp.host === l.host) return this.lastComp.data;
    const c = Buffer.alloc(l.csize);
    await this.file.read(c, l.host);
    let out: Buffer;
    try {
      out = zlib.inflateRawSync(c, { finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: this.cs });
    } catch (e) {
      throw bad(`compressed cluster at 0x${l.host.toString(16)} is corrupt: ${(e as Error).message.split('\n')[0]}`);
    }
    if (out.length !== this.cs) throw bad(`compressed cluster at 0x${l.host.toString(16)} does not inflate to one cluster`);
    this.lastComp = { host: l.host, data: out };
    return out;
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const inC = pos % this.cs;
      const n = Math.min(this.cs - inC, buf.length - done);
      const l = await this.lookup(pos);
      const sub = buf.subarray(done, done + n);
      if (l.kind === 'data') {
        await this.file.read(sub, l.host + inC);
        this.crypto?.decrypt(sub, pos / 512);
      }
      else if (l.kind === 'compressed') sub.set((await this.decompress(l)).subarray(inC, inC + n));
      else await readBacking(this.backing, sub, pos);
      done += n;
    }
  }

  async write(buf: Uint8Array, offset: number, _flags?: WriteFlags): Promise<void> {
    if (this.readOnly) throw new ImgError('readonly', 'qcow: the image is opened read-only');
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const l = await this.lookup(pos);
      if (l.kind === 'data') {
        const n = Math.min(this.cs - (pos % this.cs), buf.length - done);
        let part = buf.subarray(done, done + n);
        if (this.crypto) { part = Buffer.from(part); this.crypto.encrypt(part, pos / 512); }
        await this.file.write!(part, l.host + (pos % this.cs));
        done += n;
        continue;
      }
      done += await this.mutex.run(() => this.allocWrite(buf.subarray(done), pos));
    }
  }

  private alignEnd(): number {
    this.fileEnd = Math.ceil(this.fileEnd / this.cs) * this.cs;
    return this.fileEnd;
  }

  private async allocWrite(buf: Uint8Array, pos: number): Promise<number> {
    const cs = this.cs;
    const start = pos - (pos % cs);
    const kinds: Lookup[] = [];
    let end = start;
    while (end < pos + buf.length && end - start < MAX_BATCH) {
      const l = await this.lookup(end);
      if (l.kind === 'data') break;
      kinds.push(l);
      end += cs;
      if (Math.floor(end / cs / this.l2Entries) !== Math.floor(start / cs / this.l2Entries)) break; // one L2 table per batch
    }
    if (!kinds.length) return 0;
    const consumed = Math.min(end, pos + buf.length) - pos;
    this.mapInvalidator?.(start, end - start);
    const data = Buffer.alloc(end - start);
    const fill = async (k: number, from: number, to: number): Promise<void> => {
      if (from >= to) return;
      const l = kinds[k];
      const cStart = start + k * cs;
      if (l.kind === 'compressed') {
        data.set((await this.decompress(l)).subarray(from - cStart, to - cStart), from - start);
      } else {
        const n = Math.max(0, Math.min(to, this.size) - from);
        if (n > 0) await readBacking(this.backing, data.subarray(from - start, from - start + n), from);
      }
    };
    await fill(0, start, pos);
    await fill(kinds.length - 1, pos + consumed, end);
    data.set(buf.subarray(0, consumed), pos - start);
    const ci = start / cs;
    const l1i = Math.floor(ci / this.l2Entries);
    let l2off = this.l1Entry(l1i);
    if (!l2off) {
      if (l1i * 8 >= this.l1.length) throw bad('write beyond the L1 table');
      l2off = this.alignEnd();
      this.fileEnd += this.l2Bytes;
      await this.file.write!(Buffer.alloc(this.l2Bytes), l2off);
      const e = Buffer.alloc(8);
      e.writeBigUInt64BE(BigInt(l2off));
      await this.file.write!(e, this.hdr.l1Offset + l1i * 8);
      this.l1.writeBigUInt64BE(BigInt(l2off), l1i * 8);
    }
    const host = this.alignEnd();
    this.fileEnd += end - start;
    this.crypto?.encrypt(data, start / 512);
    await this.file.write!(data, host);
    const first = ci % this.l2Entries;
    const upd = Buffer.alloc(kinds.length * 8);
    for (let k = 0; k < kinds.length; k++) upd.writeBigUInt64BE(BigInt(host + k * cs), k * 8);
    await this.file.write!(upd, l2off + first * 8);
    this.cache.update(l2off, (t) => upd.copy(t, first * 8));
    return consumed;
  }

  async flush(): Promise<void> { if (!this.readOnly) await this.file.flush?.(); }

  /** as qemu's qcow_make_empty: clear the L1 table and drop everything after it */
  async makeEmpty(): Promise<void> {
    if (this.readOnly) throw new ImgError('readonly', 'qcow: the image is opened read-only');
    await this.mutex.run(async () => {
      this.mapInvalidator?.(0, this.size);
      this.l1.fill(0);
      await this.file.write!(this.l1, this.hdr.l1Offset);
      const end = this.hdr.l1Offset + this.l1.length;
      if (this.file.truncate && this.file.size > end) await this.file.truncate(end);
      this.fileEnd = Math.max(end, this.file.size);
      this.cache.clear();
      this.lastComp = null;
      await this.file.flush?.();
    });
  }

  async truncate(_size: number, _prealloc?: Preallocation): Promise<void> {
    throw new ImgError('unsupported', 'qcow: resizing is not supported');
  }

  async allocatedSize(): Promise<number> {
    return this.file.allocatedSize ? this.file.allocatedSize() : this.file.size;
  }

  async infoExtra(): Promise<Record<string, unknown>> {
    const r: Record<string, unknown> = { 'cluster-size': this.cs };
    if (this.backingName !== null) {
      r['backing-filename'] = this.backingName;
      r['full-backing-filename'] = fullBackingName(this.backingName, this.file.filename);
    }
    r['dirty-flag'] = false;
    return r;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      if (!this.readOnly) await this.flush();
    } finally {
      this.cache.clear();
      await this.backing?.close().catch(() => undefined);
      await this.file.close();
    }
  }
}

async function openQcow(file: BlockNode, ctx: OpenContext): Promise<QcowNode> {
  const r = new OptionReader(ctx.options, 'qcow');
  const encOpt = r.child('encrypt');
  r.finish();
  if (file.size < HEADER_LEN) throw new ImgError('image', 'Image not in qcow format');
  const b = Buffer.alloc(HEADER_LEN);
  await file.read(b, 0);
  if (b.readUInt32BE(0) !== MAGIC) throw new ImgError('image', 'Image not in qcow format');
  const version = b.readUInt32BE(4);
  if (version !== 1) throw bad(`Unsupported qcow version ${version}`);
  const h: QcowHeader = {
    backingOffset: u64(b, 8, 'backing file offset'),
    backingSize: b.readUInt32BE(16),
    mtime: b.readUInt32BE(20),
    size: u64(b, 24, 'image size'),
    clusterBits: b[32],
    l2Bits: b[33],
    cryptMethod: b.readUInt32BE(36),
    l1Offset: u64(b, 40, 'L1 table offset'),
  };
  if (h.size <= 1) throw bad('Image size is too small (must be at least 2 bytes)');
  if (h.clusterBits < 9 || h.clusterBits > 16) throw bad('Cluster size must be between 512 and 64k');
  if (h.l2Bits < 6 || h.l2Bits > 16) throw bad('L2 table size must be between 512 and 64k');
  if (h.cryptMethod > 1) throw bad('invalid encryption method in qcow header');
  const crypto = openLegacyAes(h.cryptMethod === 1, encOpt, ctx.secrets, 'qcow');
  const span = 2 ** (h.clusterBits + h.l2Bits);
  const l1Size = Math.ceil(h.size / span);
  if (l1Size * 8 > INT_MAX || l1Size * 8 > MAX_L1_BYTES) throw bad('Image is too big');
  if (h.l1Offset + l1Size * 8 > file.size) throw bad('L1 table lies past the end of the file');
  const l1 = Buffer.alloc(l1Size * 8);
  await file.read(l1, h.l1Offset);
  let backingName: string | null = null;
  if (h.backingOffset) {
    if (h.backingSize > 1023) throw bad('Backing file name too long');
    if (h.backingOffset + h.backingSize > file.size) throw bad('backing file name lies past the end of the file');
    const nb = Buffer.alloc(h.backingSize);
    await file.read(nb, h.backingOffset);
    backingName = nb.toString('utf8');
  }
  const backing = await ctx.openBacking(backingName, null);
  const node = new QcowNode(file, h, l1, ctx.readOnly, backing, backingName);
  node.crypto = crypto;
  return node;
}

async function createQcow(ctx: CreateContext): Promise<void> {
  const r = new OptionReader(ctx.options, 'qcow');
  r.markUsed('size');
  const backingFile = r.str('backing_file') ?? null;
  const backingFmt = r.str('backing_fmt') ?? null;
  const encryption = r.bool('encryption', false);
  const enc = r.child('encrypt');
  const prealloc = r.choice('preallocation', ['off', 'falloc', 'full'] as const, 'off');
  r.bool('nocow', false);
  r.int('extent_size_hint', 0);
  r.finish();
  const aesPass = legacyAesCreate(encryption, enc, ctx.secrets, 'qcow');
  aesPass?.fill(0);
  let size = ctx.size;
  if (size === null && backingFile) size = (await ctx.open(backingFile, backingFmt ?? undefined)).size;
  if (size === null) throw new ImgError('usage', 'qcow: image size required');
  size = Math.ceil(size / 512) * 512; // qemu-img rounds sizes up to whole sectors
  if (size === 0) throw new ImgError('usage', 'Image size is too small, cannot be zero length');
  const nb = backingFile ? Buffer.from(backingFile, 'utf8') : null;
  if (nb && nb.length > 1023) throw new ImgError('usage', 'qcow: backing file name too long');
  // as qemu: 512-byte clusters with 32 KiB L2 tables over a backing file, else 4 KiB with 4 KiB tables
  const clusterBits = nb ? 9 : 12;
  const l2Bits = nb ? 12 : 9;
  let headerSize = HEADER_LEN;
  if (nb) headerSize += nb.length;
  headerSize = Math.ceil(headerSize / 8) * 8;
  const l1Size = Math.ceil(size / 2 ** (clusterBits + l2Bits));
  if (l1Size * 8 > MAX_L1_BYTES) throw new ImgError('usage', 'qcow: image too large');
  const h: QcowHeader = {
    backingOffset: nb ? HEADER_LEN : 0, backingSize: nb ? nb.length : 0, mtime: 0, size, clusterBits, l2Bits, cryptMethod: aesPass ? 1 : 0,
    l1Offset: headerSize,
  };
  await createFile(ctx.filename, 0, prealloc === 'off' ? 'off' : prealloc);
  await withFileRw(ctx.filename, async (f) => {
    await f.write(serializeHeader(h), 0);
    if (nb) await f.write(nb, HEADER_LEN);
    const l1Bytes = Math.ceil((l1Size * 8) / 512) * 512;
    await f.write(Buffer.alloc(l1Bytes), headerSize);
  });
}

export const qcowDriver: FormatDriver = {
  name: 'qcow',
  probe(head: Uint8Array): number {
    if (head.length < 8) return 0;
    const b = Buffer.from(head.buffer, head.byteOffset, head.length);
    return b.readUInt32BE(0) === MAGIC && b.readUInt32BE(4) === 1 ? 100 : 0;
  },
  createOptions: ['size', 'backing_file', 'backing_fmt', 'encryption', 'encrypt.format', 'encrypt.key-secret', 'preallocation', 'nocow', 'extent_size_hint'],
  open: openQcow,
  create: createQcow,
};
