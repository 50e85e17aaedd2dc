// qcow2 image creation (qemu's qcow2_co_create): header, refcount table and blocks, L1 table,
// then optional preallocation through the normal allocation code.
import fs from 'node:fs';
import path from 'node:path';
import { ImgError } from '../../core/errors';
import type { BlockNode, CreateContext, Preallocation } from '../../core/node';
import { OptionReader, parseSize } from '../../core/options';
import { createFile, FileNode } from '../../protocols/file';
import {
  AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2, Qcow2Header,
  serializeHeader, MAX_L1_BYTES,
} from './header';
import { Qcow2Node } from './node';
import { setRef, writeEntry, OFLAG_COPIED } from './util';
import { buildLuksArea, CRYPT_AES, CRYPT_LUKS, cryptoExtData, parseEncryptCreate } from './crypto';
import { EXT_CRYPTO } from './header';

export const CREATE_OPTIONS = ['size', 'compat', 'backing_file', 'backing_fmt', 'cluster_size', 'preallocation',
  'lazy_refcounts', 'refcount_bits', 'compression_type', 'extended_l2', 'data_file', 'data_file_raw', 'nocow',
  'encryption', 'encrypt.format'];

function resolve(name: string, base: string): string {
  if (path.isAbsolute(name) || /^[a-z+]+:/.test(name)) return name;
  return path.join(path.dirname(base), name);
}

export async function createQcow2(ctx: CreateContext): Promise<void> {
  const r = new OptionReader(ctx.options, 'qcow2');
  r.markUsed('size');
  const compat = r.choice('compat', ['0.10', '1.1', 'v2', 'v3'] as const, '1.1');
  const version = compat === '0.10' || compat === 'v2' ? 2 : 3;
  const backingFile = r.str('backing_file') ?? null;
  let backingFmt = r.str('backing_fmt') ?? null;
  const clusterSize = r.int('cluster_size', 65536);
  const prealloc0 = r.choice('preallocation', ['off', 'metadata', 'falloc', 'full'] as const, 'off');
  const lazy = r.bool('lazy_refcounts', false);
  const refBits = r.int('refcount_bits', 16);
  const compression = r.choice('compression_type', ['zlib', 'zstd'] as const, 'zlib');
  const extL2 = r.bool('extended_l2', false);
  const dataFile = r.str('data_file') ?? null;
  const dataFileRaw = r.bool('data_file_raw', false);
  r.bool('nocow', false);
  const enc = parseEncryptCreate(r.child('encrypt'), r.bool('encryption', false), ctx.secrets);
  r.finish();

  if (clusterSize < 512 || clusterSize > 2 * 1024 * 1024 || (clusterSize & (clusterSize - 1))) {
    throw new ImgError('usage', 'Cluster size must be a power of two between 512 and 2048k');
  }
  const cb = Math.log2(clusterSize);
  if (refBits > 64 || refBits < 1 || (refBits & (refBits - 1))) {
    throw new ImgError('usage', 'Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (version < 3) {
    if (refBits !== 16) throw new ImgError('usage', 'Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
    if (lazy) throw new ImgError('usage', 'Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
    if (extL2) throw new ImgError('usage', 'Extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
    if (dataFile) throw new ImgError('usage', 'data-file requires compat=1.1 or greater');
    if (compression !== 'zlib') throw new ImgError('usage', 'Non-zlib compression type is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
  }
  if (extL2 && clusterSize < 16384) throw new ImgError('usage', 'Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  if (dataFileRaw && !dataFile) throw new ImgError('usage', 'data-file-raw requires data-file');
  if (backingFmt && !backingFile) throw new ImgError('usage', 'Backing format cannot be used without backing file');
  if (backingFile && dataFileRaw) throw new ImgError('usage', 'Backing file and data-file-raw cannot be used at the same time');
  const prealloc: Preallocation = dataFileRaw && prealloc0 === 'off' ? 'metadata' : prealloc0;
  if (backingFile && prealloc !== 'off') throw new ImgError('usage', 'Backing file and preallocation can only be used at the same time if extended_l2 is on');

  let size = ctx.size;
  if (backingFile && (size === null || !backingFmt)) {
    let b: BlockNode;
    try {
      b = await ctx.open(resolve(backingFile, ctx.filename), backingFmt ?? undefined);
    } catch (e) {
      throw new ImgError((e as ImgError).kind ?? 'usage', `Could not open backing image: ${(e as Error).message}`, e);
    }
    try {
      if (size === null) size = b.size;
      if (!backingFmt) backingFmt = b.driver;
    } finally {
      await b.close();
    }
  }
  if (size === null) throw new ImgError('usage', 'Image creation needs a size parameter');
  size = Math.ceil(size / 512) * 512;

  const refOrder = Math.log2(refBits);
  const es = extL2 ? 16 : 8;
  const l2Entries = clusterSize / es;
  const l1Size = Math.ceil(size / (clusterSize * l2Entries));
  if (l1Size * 8 > MAX_L1_BYTES) throw new ImgError('usage', 'Image size is too big for this cluster size');
  const l1Clusters = Math.ceil((l1Size * 8) / clusterSize);
  const perBlock = (clusterSize * 8) / refBits;
  // reftable at cluster 1, refblocks after it, L1 after them
  let rtClusters = 1;
  let nrb = 1;
  for (let i = 0; i < 64; i++) {
    const total = 1 + rtClusters + nrb + l1Clusters;
    const nrb2 = Math.ceil(total / perBlock);
    const rt2 = Math.ceil((nrb2 * 8) / clusterSize);
    if (nrb2 === nrb && rt2 === rtClusters) break;
    nrb = nrb2; rtClusters = rt2;
  }
  const total = 1 + rtClusters + nrb + l1Clusters;
  const h: Qcow2Header = {
    version, backingFileOffset: 0, backingFileSize: 0, clusterBits: cb, size, cryptMethod: 0,
    l1Size, l1TableOffset: l1Size ? (1 + rtClusters + nrb) * clusterSize : 0,
    refcountTableOffset: clusterSize, refcountTableClusters: rtClusters, nbSnapshots: 0, snapshotsOffset: 0,
    incompatible: (dataFile ? INCOMPAT_DATA_FILE : 0n) | (compression === 'zstd' ? INCOMPAT_COMPRESSION : 0n) | (extL2 ? INCOMPAT_EXTL2 : 0n),
    compatible: lazy ? COMPAT_LAZY_REFCOUNTS : 0n,
    autoclear: dataFileRaw ? AUTOCLEAR_DATA_FILE_RAW : 0n,
    refcountOrder: refOrder, headerLength: version >= 3 ? 112 : 72, compressionType: compression === 'zstd' ? 1 : 0,
    backingFile, backingFormat: backingFile ? backingFmt : null, dataFile, featureNames: [], otherExtensions: [],
  };
  const headerBuf = serializeHeader(h);
  const rt = Buffer.alloc(rtClusters * clusterSize);
  const blocks = Buffer.alloc(nrb * clusterSize);
  for (let k = 0; k < nrb; k++) writeEntry(rt, k * 8, (1 + rtClusters + k) * clusterSize, 0);
  for (let c = 0; c < total; c++) {
    const k = Math.floor(c / perBlock);
    setRef(blocks.subarray(k * clusterSize, (k + 1) * clusterSize), c % perBlock, refOrder, 1);
  }

  const created: string[] = [];
  let node: Qcow2Node | null = null;
  let file: FileNode | null = null;
  let data: FileNode | null = null;
  try {
    const existed = fs.existsSync(ctx.filename);
    await createFile(ctx.filename, 0, 'off');
    if (!existed) created.push(ctx.filename);
    file = FileNode.open({ filename: ctx.filename, readOnly: false, direct: false, noFlush: false, writethrough: false, locking: 'auto', shareRw: false });
    await file.write(headerBuf, 0);
    await file.write(rt, clusterSize);
    await file.write(blocks, (1 + rtClusters) * clusterSize);
    if (l1Size) await file.write(Buffer.alloc(l1Size * 8), h.l1TableOffset);
    if (dataFile) {
      const dpath = resolve(dataFile, ctx.filename);
      const dExisted = fs.existsSync(dpath);
      await createFile(dpath, size, prealloc === 'metadata' ? 'off' : prealloc);
      if (!dExisted) created.push(dpath);
      data = FileNode.open({ filename: dpath, readOnly: false, direct: false, noFlush: false, writethrough: false, locking: 'auto', shareRw: false });
    }
    if (enc) {
      // the LUKS header goes into clusters of its own, named by the crypto header extension
      const en = new Qcow2Node({ file, header: h, readOnly: false, backing: null, dataFile: data, filename: ctx.filename, l2CacheBytes: 1 << 20, refCacheBytes: 1 << 20 });
      await en.init();
      if (enc.format === 'luks') {
        const area = await buildLuksArea(enc);
        const off = await en.allocClusters(Math.ceil(area.length / clusterSize));
        await file.write(area, off);
        h.otherExtensions.push({ type: EXT_CRYPTO, data: cryptoExtData(off, area.length) });
      }
      h.cryptMethod = enc.format === 'luks' ? CRYPT_LUKS : CRYPT_AES;
      enc.pass.fill(0);
      await en.writeHeader();
    }
    if (prealloc !== 'off') {
      node = new Qcow2Node({ file, header: h, readOnly: false, backing: null, dataFile: data, filename: ctx.filename, l2CacheBytes: 1 << 20, refCacheBytes: 1 << 20 });
      await node.init();
      await preallocateMetadata(node, prealloc);
    }
    await file.flush();
    if (data) await data.flush();
  } catch (e) {
    for (const f of created) { try { fs.unlinkSync(f); } catch { /* already gone */ } }
    throw e;
  } finally {
    if (data) await data.close();
    if (file) await file.close();
  }
}

/** allocates every L2 table, then every data cluster (contiguous, after the tables) */
async function preallocateMetadata(node: Qcow2Node, mode: Preallocation): Promise<void> {
  const cs = node.cs;
  const clusters = Math.ceil(node.size / cs);
  const tables: { buf: Buffer; off: number }[] = [];
  for (let i = 0; i * node.l2Entries < clusters; i++) tables.push(await node.l2ForWrite(i));
  const dataStart = node.dataFile ? 0 : await node.allocClusters(clusters);
  for (let gc = 0; gc < clusters; gc++) {
    const t = tables[Math.floor(gc / node.l2Entries)];
    const at = (gc % node.l2Entries) * node.es;
    writeEntry(t.buf, at, node.dataFile ? gc * cs : dataStart + gc * cs, OFLAG_COPIED);
    if (node.extL2) { t.buf.writeUInt32BE(0, at + 8); t.buf.writeUInt32BE(0xffffffff, at + 12); }
  }
  for (const t of tables) await node.file.write!(t.buf, t.off);
  if (!node.dataFile) {
    const end = dataStart + clusters * cs;
    const f = node.file as FileNode;
    if (end > f.size) await f.truncate(end, mode === 'metadata' ? 'off' : mode);
  }
}

export { parseSize };
