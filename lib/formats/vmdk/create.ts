// vmdk image creation as qemu's vmdk_co_do_create: every subformat, the descriptor, hosted
// sparse extents with a redundant grain directory; streamOptimized with a footer.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { ImgError } from '../../core/errors';
import type { CreateContext, Preallocation } from '../../core/node';
import { OptionReader } from '../../core/options';
import { createFile, FileNode } from '../../protocols/file';
import { buildDescriptor } from './descriptor';
import {
  COMPRESSION_DEFLATE, FLAG_COMPRESS, FLAG_MARKER, FLAG_NL_DETECT, FLAG_RGD, FLAG_ZERO_GRAIN, MARKER_EOS, MARKER_FOOTER,
  MARKER_GD, markerSector, SECTOR, serializeVmdk4, Vmdk4Header,
} from './header';

export const SUBFORMATS = ['monolithicSparse', 'monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat', 'streamOptimized'] as const;
export const ADAPTERS = ['ide', 'buslogic', 'lsilogic', 'legacyESX'] as const;
export const CREATE_OPTIONS = ['size', 'subformat', 'adapter_type', 'backing_file', 'backing_fmt', 'compat6', 'hwversion',
  'toolsversion', 'zeroed_grain', 'preallocation', 'nocow', 'extent_size_hint'];

const SPLIT_SIZE = 0x80000000;
const DESC_SECTORS = 20;
const MAX_CAPACITY = 2 ** 41 * 1024; // VMDK4 grain tables address 2^32 sectors of data per extent; qemu allows large capacities

function openRw(filename: string): FileNode {
  return FileNode.open({ filename, readOnly: false, direct: false, noFlush: false, writethrough: false, locking: 'auto', shareRw: false });
}

/** writes an empty hosted sparse extent of `bytes` (qemu's vmdk_init_extent) */
async function initSparse(filename: string, bytes: number, compress: boolean, zeroed: boolean): Promise<void> {
  await createFile(filename, 0, 'off');
  const f = openRw(filename);
  try {
    const capacity = Math.floor(bytes / SECTOR);
    const gran = 128;
    const gtes = 512;
    const grains = Math.ceil(capacity / gran);
    const gtSize = Math.ceil(gtes * 4 / SECTOR);
    const gtCount = Math.ceil(grains / gtes);
    const gdSectors = Math.ceil(gtCount * 4 / SECTOR);
    if (compress) {
      // streamOptimized: grains follow the descriptor; GD, footer and end-of-stream marker at the end
      const grainOffset = 128;
      const h: Vmdk4Header = {
        version: 3, flags: FLAG_NL_DETECT | FLAG_COMPRESS | FLAG_MARKER | (zeroed ? FLAG_ZERO_GRAIN : 0), capacity,
        granularity: gran, descOffset: 1, descSize: DESC_SECTORS, numGtesPerGt: gtes, rgdOffset: 0, gdOffset: -1,
        grainOffset, compressAlgorithm: COMPRESSION_DEFLATE,
      };
      const tail = Buffer.concat([
        markerSector(gdSectors, MARKER_GD), Buffer.alloc(gdSectors * SECTOR),
        markerSector(1, MARKER_FOOTER), serializeVmdk4({ ...h, gdOffset: grainOffset + 1 }),
        markerSector(0, MARKER_EOS),
      ]);
      await f.write(serializeVmdk4(h), 0);
      await f.write(tail, grainOffset * SECTOR);
    } else {
      const rgdOffset = 1 + DESC_SECTORS;
      const gdOffset = rgdOffset + gdSectors + gtSize * gtCount;
      const grainOffset = Math.ceil((gdOffset + gdSectors + gtSize * gtCount) / gran) * gran;
      const h: Vmdk4Header = {
        version: zeroed ? 2 : 1, flags: FLAG_RGD | FLAG_NL_DETECT | (zeroed ? FLAG_ZERO_GRAIN : 0), capacity,
        granularity: gran, descOffset: 1, descSize: DESC_SECTORS, numGtesPerGt: gtes, rgdOffset, gdOffset, grainOffset,
        compressAlgorithm: 0,
      };
      await f.write(serializeVmdk4(h), 0);
      await f.truncate(grainOffset * SECTOR);
      const gd = Buffer.alloc(gdSectors * SECTOR);
      for (let i = 0; i < gtCount; i++) gd.writeUInt32LE(rgdOffset + gdSectors + i * gtSize, i * 4);
      await f.write(gd, rgdOffset * SECTOR);
      for (let i = 0; i < gtCount; i++) gd.writeUInt32LE(gdOffset + gdSectors + i * gtSize, i * 4);
      await f.write(gd, gdOffset * SECTOR);
    }
    await f.flush();
  } finally {
    await f.close();
  }
}

export async function createVmdk(ctx: CreateContext): Promise<void> {
  const r = new OptionReader(ctx.options, 'vmdk');
  r.markUsed('size');
  const subformat = r.choice('subformat', SUBFORMATS, 'monolithicSparse');
  const adapter = r.choice('adapter_type', ADAPTERS, 'ide');
  const backingFile = r.str('backing_file') ?? null;
  const backingFmt = r.str('backing_fmt');
  const compat6 = r.bool('compat6', false);
  let hw = r.str('hwversion');
  if (hw === 'undefined') hw = undefined;
  const tools = r.str('toolsversion') ?? '2147483647';
  const zeroed = r.bool('zeroed_grain', false);
  const prealloc = r.choice('preallocation', ['off', 'falloc', 'full'] as const, 'off') as Preallocation;
  r.bool('nocow', false);
  r.int('extent_size_hint', 0);
  r.finish();
  if (backingFmt !== undefined && backingFmt !== 'vmdk') throw new ImgError('usage', 'vmdk: backing_file must be a vmdk image');
  if (compat6 && hw !== undefined) throw new ImgError('usage', 'vmdk: compat6 cannot be enabled with hwversion set');
  const hwVersion = compat6 ? '6' : hw ?? '4';
  for (const [k, v] of [['hwversion', hwVersion], ['toolsversion', tools]]) {
    if (/["\n\r]/.test(v)) throw new ImgError('usage', `vmdk: invalid ${k} '${v}'`);
  }
  const split = subformat === 'twoGbMaxExtentFlat' || subformat === 'twoGbMaxExtentSparse';
  const flat = subformat === 'monolithicFlat' || subformat === 'twoGbMaxExtentFlat';
  const compress = subformat === 'streamOptimized';
  if (flat && backingFile) throw new ImgError('unsupported', 'vmdk: Flat image can\'t have backing file');
  if (flat && zeroed) throw new ImgError('unsupported', 'vmdk: Flat image can\'t enable zeroed grain');
  if (!flat && prealloc !== 'off') throw new ImgError('unsupported', `vmdk: preallocation=${prealloc} is only supported for flat subformats`);

  let parentCid = 0xffffffff;
  let size = ctx.size;
  if (backingFile) {
    if (/["\n\r]/.test(backingFile)) throw new ImgError('usage', 'vmdk: invalid backing file name');
    const full = path.isAbsolute(backingFile) ? backingFile : path.join(path.dirname(ctx.filename), backingFile);
    let b;
    try {
      b = await ctx.open(full);
    } catch (e) {
      throw new ImgError((e as ImgError).kind ?? 'usage', `Could not open backing image: ${(e as Error).message}`, e);
    }
    if (b.driver !== 'vmdk') throw new ImgError('usage', `vmdk: Invalid backing file format: ${b.driver}. Must be vmdk`);
    parentCid = (b as unknown as { cid: number }).cid;
    if (size === null) size = b.size;
  }
  if (size === null) throw new ImgError('usage', 'vmdk: image size required');
  size = Math.ceil(size / SECTOR) * SECTOR;
  if (size > MAX_CAPACITY) throw new ImgError('usage', 'vmdk: image size is too large');

  const dir = path.dirname(ctx.filename);
  const base = path.basename(ctx.filename);
  const dot = base.lastIndexOf('.');
  const prefix = dot < 0 ? base : base.slice(0, dot);
  const postfix = dot < 0 ? '' : base.slice(dot);
  const lines: string[] = [];
  const created: string[] = [];
  const line = (bytes: number, name: string): string => (flat
    ? `RW ${Math.ceil(bytes / SECTOR)} FLAT "${name}" 0\n` : `RW ${Math.ceil(bytes / SECTOR)} SPARSE "${name}"\n`);
  try {
    if (!split && !flat) {
      await initSparse(ctx.filename, size, compress, zeroed);
      lines.push(line(size, base));
    } else {
      await createFile(ctx.filename, 0, 'off');
      const extentSize = split ? SPLIT_SIZE : size;
      let done = 0;
      let idx = 1;
      while (done < size) {
        const cur = Math.min(size - done, extentSize);
        const name = split ? `${prefix}-${flat ? 'f' : 's'}${String(idx).padStart(3, '0')}${postfix}` : `${prefix}-flat${postfix}`;
        const full = path.join(dir, name);
        created.push(full);
        if (flat) await createFile(full, cur, prealloc);
        else await initSparse(full, cur, false, zeroed);
        lines.push(line(cur, name));
        done += cur;
        idx++;
      }
    }
    const desc = buildDescriptor({
      cid: crypto.randomBytes(4).readUInt32LE(0), parentCid, createType: subformat,
      parentHint: backingFile, extentLines: lines, hwVersion, size, adapterType: adapter, toolsVersion: tools,
    });
    const db = Buffer.from(desc, 'latin1');
    const f = openRw(ctx.filename);
    try {
      if (!split && !flat) {
        if (db.length > DESC_SECTORS * SECTOR) throw new ImgError('usage', 'vmdk: the descriptor does not fit into the image header');
        await f.write(db, SECTOR);
      } else {
        await f.write(db, 0);
        await f.truncate(db.length);
      }
      await f.flush();
    } finally {
      await f.close();
    }
  } catch (e) {
    for (const c of created) { try { fs.unlinkSync(c); } catch { /* not created */ } }
    throw e;
  }
}
