// vmdk (VMware virtual disk): driver object for the registry. Opens monolithic sparse files
// (KDMV/COWD) and descriptor files with FLAT, VMFS, SPARSE, VMFSSPARSE, SESPARSE and ZERO extents.
import path from 'node:path';
import { ImgError } from '../../core/errors';
import type { BlockNode, CheckResult, FormatDriver, OpenContext } from '../../core/node';
import { OptionReader } from '../../core/options';
import { FileNode } from '../../protocols/file';
import { checkExtentPath, Descriptor, MAX_DESC_BYTES, parseDescriptor } from './descriptor';
import { FlatExtent, openSeSparse, openSparse, SparseExtent, VmdkExtent, ZeroExtent } from './extent';
import { SECTOR, VMDK3_MAGIC, VMDK4_MAGIC } from './header';
import { DescLocation, VmdkNode } from './node';
import { createVmdk, CREATE_OPTIONS } from './create';

const MAX_EXTENTS = 4096;
const DESC_TYPES = ['monolithicFlat', 'vmfs', 'vmfsSparse', 'seSparse', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat',
  'monolithicSparse', 'streamOptimized', 'vmfsThin', 'vmfsPreallocated', 'vmfsEagerZeroedThick', 'custom'];

/** qemu's vmdk_probe */
export function probeVmdk(head: Uint8Array): number {
  if (head.length < 4) return 0;
  const b = Buffer.from(head.buffer, head.byteOffset, head.length);
  const magic = b.readUInt32BE(0);
  if (magic === VMDK3_MAGIC || magic === VMDK4_MAGIC) return 100;
  if (b.subarray(0, 21).toString('latin1') === '# Disk DescriptorFile') return 100;
  let p = 0;
  const end = b.length;
  while (p < end) {
    if (b[p] === 0x23) { // '#': comment line
      while (p < end && b[p] !== 0x0a) p++;
      p++;
      continue;
    }
    if (b[p] === 0x20) {
      while (p < end && b[p] === 0x20) p++;
      if (p < end && b[p] === 0x0d) p++;
      if (p === end || b[p] !== 0x0a) return 0;
      p++;
      continue;
    }
    const rest = b.subarray(p, p + 11).toString('latin1');
    if (/^version=[123]\r?\n/.test(rest)) return 100;
    return 0;
  }
  return 0;
}

async function readHead(file: BlockNode, at: number, len: number): Promise<Buffer> {
  const n = Math.max(0, Math.min(len, file.size - at));
  const b = Buffer.alloc(n);
  if (n) await file.read(b, at);
  return b;
}

interface Opened { extents: VmdkExtent[]; desc: Descriptor; loc: DescLocation; createType: string }

async function openExtents(file: BlockNode, ctx: OpenContext, allowExternal: boolean, readOnly: boolean): Promise<Opened> {
  if (file.size < 4) throw new ImgError('image', `vmdk: '${file.filename}': File is too small, not a valid image`);
  const head = await readHead(file, 0, SECTOR);
  const magic = head.readUInt32BE(0);
  const extents: VmdkExtent[] = [];
  if (magic === VMDK4_MAGIC || magic === VMDK3_MAGIC) {
    if (magic === VMDK4_MAGIC && head.length >= 44 && head.readBigUInt64LE(12) === 0n && head.readBigUInt64LE(28) !== 0n) {
      // capacity 0 with a descriptor offset: the descriptor describes the extents
      const off = Number(head.readBigUInt64LE(28) & 0xffffffffffffn) * SECTOR;
      if (off >= file.size) throw new ImgError('image', `vmdk: '${file.filename}': descriptor offset is beyond the end of the file`);
      const text = await readHead(file, off, MAX_DESC_BYTES);
      return openDescriptor(file, ctx, text, off, allowExternal, readOnly);
    }
    const ext = await openSparse(file, head, '', readOnly, null);
    extents.push(ext);
    const p = ext.p;
    const descOff = p.descOffset || SECTOR;
    const room = p.descSize ? Math.min(p.descSize, MAX_DESC_BYTES) : 20 * SECTOR;
    const text = magic === VMDK4_MAGIC ? await readHead(file, descOff, room) : Buffer.alloc(0);
    const desc = parseDescriptor(text, `vmdk: '${file.filename}'`);
    if (magic === VMDK4_MAGIC && desc.cid === null) throw new ImgError('image', `vmdk: '${file.filename}': invalid VMDK image descriptor (no CID)`);
    return {
      extents, desc, loc: { file, offset: descOff, room, text: desc.text },
      createType: ext.compressed ? 'streamOptimized' : 'monolithicSparse',
    };
  }
  const text = await readHead(file, 0, MAX_DESC_BYTES);
  return openDescriptor(file, ctx, text, 0, allowExternal, readOnly);
}

async function openDescriptor(file: BlockNode, ctx: OpenContext, text: Buffer, off: number, allowExternal: boolean,
  readOnly: boolean): Promise<Opened> {
  const what = `vmdk: '${file.filename}'`;
  const desc = parseDescriptor(text, what);
  if (desc.createType === null) throw new ImgError('image', `${what}: invalid VMDK image descriptor`);
  if (!DESC_TYPES.includes(desc.createType)) throw new ImgError('unsupported', `${what}: Unsupported image type '${desc.createType.slice(0, 40)}'`);
  if (desc.extents.length === 0) throw new ImgError('image', `${what}: the descriptor lists no extents`);
  if (desc.extents.length > MAX_EXTENTS) throw new ImgError('image', `${what}: too many extents`);
  if (desc.cid === null || desc.parentCid === null) throw new ImgError('image', `${what}: invalid VMDK image descriptor (no CID)`);
  const total = desc.extents.reduce((a, l) => a + l.sectors * SECTOR, 0);
  if (!Number.isSafeInteger(total) || total > 2 ** 52) throw new ImgError('image', `${what}: the extents add up to an impossible disk size`);
  const extents: VmdkExtent[] = [];
  // one child per extent file: a descriptor naming the same file many times opens it once
  const children = new Map<string, BlockNode>();
  try {
    for (let i = 0; i < desc.extents.length; i++) {
      const l = desc.extents[i];
      if (l.type === 'ZERO') { extents.push(new ZeroExtent(file, l.sectors * SECTOR, 'ZERO', true)); continue; }
      checkExtentPath(l.filename, allowExternal, what);
      const ro = readOnly || l.access !== 'RW';
      const key = `${ro ? 'r' : 'w'}:${path.normalize(l.filename)}`;
      let child = children.get(key);
      const fresh = !child;
      if (!child) {
        child = await ctx.openChild(`extents.${i}`, l.filename, 'file', ro);
        children.set(key, child);
      }
      try {
        if (l.type === 'FLAT' || l.type === 'VMFS') {
          extents.push(new FlatExtent(child, l.sectors * SECTOR, l.type, ro, l.flatOffset * SECTOR));
        } else if (l.type === 'SESPARSE') {
          extents.push(await openSeSparse(child, await readHead(child, 0, SECTOR), ro));
        } else {
          const h = await readHead(child, 0, SECTOR);
          if (h.length >= 4 && h.readUInt32BE(0) !== VMDK4_MAGIC && h.readUInt32BE(0) !== VMDK3_MAGIC) {
            throw new ImgError('image', `${what}: extent '${l.filename}' is not a VMDK sparse extent`);
          }
          const e = await openSparse(child, h, l.type, ro, null);
          if (e.p.descOffset && e.p.descSize && e.p.header && e.p.header.capacity === 0) throw new ImgError('image', `${what}: nested descriptor in extent '${l.filename}'`);
          extents.push(e);
        }
      } catch (e) {
        if (fresh) { children.delete(key); await child.close().catch(() => undefined); }
        throw e;
      }
    }
  } catch (e) {
    for (const c of children.values()) if (c !== file) await c.close().catch(() => undefined);
    throw e;
  }
  return { extents, desc, loc: { file, offset: off, room: off ? text.length : 0, text: desc.text }, createType: desc.createType };
}

async function openVmdk(file: BlockNode, ctx: OpenContext): Promise<VmdkNode> {
  const r = new OptionReader(ctx.options, 'vmdk');
  const allowExternal = r.bool('x-allow-external-extents', false);
  r.markUsed('extents');
  r.finish();
  const o = await openExtents(file, ctx, allowExternal, ctx.readOnly);
  let backing: BlockNode | null = null;
  try {
    const hint = o.desc.parentHint;
    backing = await ctx.openBacking(hint, hint ? 'vmdk' : null);
    const full = hint ? (path.isAbsolute(hint) ? hint : path.join(path.dirname(ctx.filename), hint)) : null;
    return new VmdkNode(file, o.extents, ctx.readOnly, backing, o.createType, o.desc.cid ?? 0, o.desc.parentCid ?? 0xffffffff,
      o.loc, hint, full);
  } catch (e) {
    for (const x of o.extents) if (x.file !== file) await x.file.close().catch(() => undefined);
    await backing?.close().catch(() => undefined);
    throw e;
  }
}

/** qemu's vmdk_co_check: every allocated grain (and grain table) must lie inside its extent file */
async function checkVmdk(node: VmdkNode): Promise<CheckResult> {
  const res: CheckResult = { checkErrors: 0, corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, messages: [] };
  const say = (m: string): void => { if (res.messages.length < 100) res.messages.push(m); };
  for (const e of node.extents) {
    if (!(e instanceof SparseExtent)) continue;
    const flen = e.file.size;
    const cs = e.clusterSize;
    const grains = Math.ceil(e.size / cs);
    for (let i = 0; i < e.l1.length && i * e.gtEntries < grains; i++) {
      let gtOff: number;
      try {
        gtOff = e.gtOffset(i);
      } catch (x) {
        res.corruptions++; say(`ERROR: ${(x as Error).message}`); continue;
      }
      if (!gtOff) continue;
      if (gtOff + e.gtBytes > flen) {
        res.corruptions++;
        say(`ERROR: grain table ${i} of '${e.file.filename}' points after EOF`);
        continue;
      }
      for (let j = 0; j < e.gtEntries; j++) {
        const g = i * e.gtEntries + j;
        if (g >= grains) break;
        let h: number | string;
        try {
          h = await e.lookup(g);
        } catch (x) {
          res.corruptions++; say(`ERROR: could not get cluster_offset for sector ${(e.start + g * cs) / SECTOR}`); continue;
        }
        if (typeof h === 'number' && h >= flen) {
          res.corruptions++;
          say(`ERROR: cluster offset for sector ${(e.start + g * cs) / SECTOR} points after EOF`);
        }
      }
    }
  }
  return res;
}

export const vmdkDriver: FormatDriver = {
  name: 'vmdk',
  probe: (head) => probeVmdk(head),
  createOptions: CREATE_OPTIONS,
  open: (file, ctx) => openVmdk(file, ctx),
  create: (ctx) => createVmdk(ctx),
  async check(file, ctx, repair) {
    if (repair !== 'none') throw new ImgError('unsupported', 'vmdk: repairing vmdk images is not supported');
    const opened: BlockNode[] = [];
    const cctx: OpenContext = {
      ...ctx,
      readOnly: true,
      options: {},
      openBacking: async () => null,
      openChild: async (_key, name) => {
        const full = path.isAbsolute(name) ? name : path.join(path.dirname(ctx.filename), name);
        const f = FileNode.open({ filename: full, readOnly: true, direct: false, noFlush: false, writethrough: false, locking: 'off', shareRw: true });
        opened.push(f);
        return f;
      },
    };
    let o: Opened;
    try {
      o = await openExtents(file, cctx, false, true);
    } catch (e) {
      for (const f of opened) await f.close().catch(() => undefined);
      throw e;
    }
    try {
      const node = new VmdkNode(file, o.extents, true, null, o.createType, o.desc.cid ?? 0, o.desc.parentCid ?? 0, o.loc, null, null);
      return await checkVmdk(node);
    } finally {
      for (const f of opened) await f.close().catch(() => undefined);
    }
  },
};
