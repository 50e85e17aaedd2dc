// qcow2 (QEMU copy-on-write v2/v3): driver object for the registry.
import { ImgError } from '../../core/errors';
import type { BlockNode, FormatDriver, OpenContext } from '../../core/node';
import { OptionReader } from '../../core/options';
import {
  AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, MAX_CLUSTER_BITS, parseHeader, QCOW_MAGIC,
} from './header';
import { Qcow2Node } from './node';
import { createQcow2, CREATE_OPTIONS } from './create';
import { checkQcow2 } from './check';
import { openQcow2Crypto } from './crypto';

const MAX_CACHE = 32 * 1024 * 1024;

/** reads and validates the header of `file` */
export async function readHeader(file: BlockNode) {
  const headLen = Math.min(file.size, 2 ** MAX_CLUSTER_BITS);
  if (headLen < 72) throw new ImgError('image', 'Image is not in qcow2 format');
  const first = Buffer.alloc(Math.min(headLen, 4096));
  await file.read(first, 0);
  if (first.readUInt32BE(0) !== QCOW_MAGIC) throw new ImgError('image', 'Image is not in qcow2 format');
  const cb = first.readUInt32BE(20);
  let head = first;
  if (cb >= 9 && cb <= MAX_CLUSTER_BITS && 2 ** cb > first.length && headLen > first.length) {
    head = Buffer.alloc(Math.min(headLen, 2 ** cb));
    await file.read(head, 0);
  }
  return parseHeader(head, file.size);
}

export interface OpenedParts { node: Qcow2Node }

export async function openQcow2(file: BlockNode, ctx: OpenContext, forCheck = false): Promise<Qcow2Node> {
  const r = new OptionReader(ctx.options, 'qcow2');
  const l2Cache = r.int('l2-cache-size', MAX_CACHE, 0, Number.MAX_SAFE_INTEGER);
  const refCache = r.int('refcount-cache-size', 4 << 20, 0, Number.MAX_SAFE_INTEGER);
  for (const k of ['cache-size', 'l2-cache-entry-size', 'cache-clean-interval', 'lazy-refcounts', 'pass-discard-request',
    'pass-discard-snapshot', 'pass-discard-other', 'overlap-check', 'discard-no-unref', 'data-file', 'encrypt',
    'detect-zeroes']) r.markUsed(k);
  r.finish();
  const h = await readHeader(file);
  const crypto = forCheck ? null : await openQcow2Crypto(file, h, ctx.options, ctx.secrets, ctx.headerOnly);
  let readOnly = ctx.readOnly;
  if ((h.incompatible & INCOMPAT_CORRUPT) && !readOnly && !forCheck) {
    throw new ImgError('image', 'qcow2: Image is corrupt; cannot be opened read/write');
  }
  let dataFile: BlockNode | null = null;
  let backing: BlockNode | null = null;
  try {
    if (h.incompatible & INCOMPAT_DATA_FILE) {
      const override = ctx.options['data-file'];
      if (h.dataFile === null && override === undefined) throw new ImgError('image', "qcow2: Missing data-file option for an image with an external data file");
      dataFile = await ctx.openChild('data-file', h.dataFile ?? '', 'file', readOnly);
    } else if (h.dataFile !== null) {
      throw new ImgError('image', 'qcow2: data-file header extension without the external data file feature');
    }
    if (h.backingFile !== null) {
      if (dataFile && (h.autoclear & AUTOCLEAR_DATA_FILE_RAW)) {
        throw new ImgError('image', 'qcow2: backing files are incompatible with a raw external data file');
      }
      backing = await ctx.openBacking(h.backingFile, h.backingFormat);
    } else {
      backing = await ctx.openBacking(null, null);
    }
    const node = new Qcow2Node({
      file, header: h, readOnly, backing, dataFile, filename: file.filename,
      l2CacheBytes: Math.min(l2Cache || MAX_CACHE, MAX_CACHE), refCacheBytes: Math.min(refCache || (4 << 20), MAX_CACHE), crypto,
    });
    await node.init();
    if ((h.incompatible & INCOMPAT_DIRTY) && !readOnly && !forCheck) {
      // refcounts may be stale (lazy_refcounts): rebuild them as qemu does
      await checkQcow2(node, 'all');
      node.hdr.incompatible &= ~INCOMPAT_DIRTY;
      await node.writeFeatureBits();
      await file.flush?.();
    }
    return node;
  } catch (e) {
    await dataFile?.close().catch(() => undefined);
    await backing?.close().catch(() => undefined);
    throw e;
  }
}

export const qcow2Driver: FormatDriver = {
  name: 'qcow2',
  probe(head: Uint8Array): number {
    if (head.length < 8) return 0;
    const b = Buffer.from(head.buffer, head.byteOffset, head.length);
    return b.readUInt32BE(0) === QCOW_MAGIC && b.readUInt32BE(4) >= 2 ? 100 : 0;
  },
  createOptions: CREATE_OPTIONS,
  open: (file, ctx) => openQcow2(file, ctx),
  create: (ctx) => createQcow2(ctx),
  async check(file, ctx, repair) {
    const node = await openQcow2(file, { ...ctx, openBacking: async () => null }, true);
    try {
      return await checkQcow2(node, repair);
    } finally {
      // the caller owns `file`; close only what we opened
      await node.dataFile?.close().catch(() => undefined);
    }
  },
};
