// vvfat: a virtual FAT disk made from a host directory (qemu's block/vvfat.c, option names
// dir, fat-type, floppy, rw, label). `fat:[floppy:][rw:][12:|16:|32:]<dir>` is the short form.
import path from 'node:path';
import createDebug from 'debug';
import { ImgError } from '../../core/errors';
import type { BlockNode } from '../../core/node';
import { cloneTree, mergeTrees, OptionReader, OptionTree, parseBool, parseJsonFilename, parseOptionString } from '../../core/options';
import { buildLayout, FatType } from './layout';
import { VvfatNode } from './node';
import { initialBaseline } from './commit';

const debug = createDebug('imgmount:vvfat');

export { VvfatNode } from './node';

/** Parses `fat:[floppy:][rw:][12:|16:|32:]<dir>` (prefixes in any order) into qemu's options. */
export function parseFatSpec(spec: string): OptionTree {
  if (!spec.startsWith('fat:')) throw new ImgError('usage', `'${spec}': a virtual FAT disk name must start with 'fat:'`);
  let rest = spec.slice(4);
  const tree: OptionTree = { driver: 'vvfat' };
  for (;;) {
    const m = /^(floppy|rw|12|16|32):/.exec(rest);
    if (!m) break;
    if (m[1] === 'floppy') tree.floppy = 'on';
    else if (m[1] === 'rw') tree.rw = 'on';
    else {
      if (tree['fat-type'] !== undefined && tree['fat-type'] !== m[1]) {
        throw new ImgError('usage', `'${spec}': more than one FAT type given`);
      }
      tree['fat-type'] = m[1];
    }
    rest = rest.slice(m[0].length);
  }
  if (!rest) throw new ImgError('usage', `'${spec}': no directory given`);
  tree.dir = rest;
  return tree;
}

/** True when an image argument (as openImage takes it: a fat: spec, json:{...}, or an
 *  --image-opts string, plus -o options) asks for a writable virtual FAT disk (rw). The mount
 *  path refuses `-s` then: check this before opening, since a read-only open hides it. */
export function vvfatRwRequested(spec: string, o: { imageOpts?: boolean; options?: OptionTree; format?: string } = {}): boolean {
  try {
    let tree: OptionTree = o.imageOpts ? parseOptionString(spec) : spec.startsWith('json:') ? parseJsonFilename(spec) : { filename: spec };
    if (o.options) tree = mergeTrees(cloneTree(tree), o.options);
    const fn = tree.filename;
    const fromSpec = typeof fn === 'string' && fn.startsWith('fat:') ? parseFatSpec(fn) : {};
    const driver = tree.driver ?? o.format ?? fromSpec.driver;
    if (driver !== 'vvfat') return false;
    const rw = tree.rw ?? fromSpec.rw;
    return typeof rw === 'string' && parseBool(rw, 'rw');
  } catch {
    return false;
  }
}

/** The mount path refuses `-s` with a writable vvfat node (see vvfatRwRequested): writes of
 *  a fat:rw: disk land in the host directory, a snapshot overlay would silently drop them. */
export function isWritableVvfat(node: BlockNode): boolean {
  return node.driver === 'vvfat' && !node.readOnly;
}

// generic keys the graph may leave in the tree
const GENERIC = ['driver', 'node-name', 'read-only', 'auto-read-only', 'cache', 'discard', 'detect-zeroes', 'force-share'];

/** Opens a vvfat node from an option tree (driver=vvfat or filename=fat:...). */
export async function openVvfat(tree: OptionTree, readOnly: boolean): Promise<BlockNode> {
  let t: OptionTree = { ...tree };
  const fn = t.filename;
  if (typeof fn === 'string' && fn.startsWith('fat:')) {
    const parsed = parseFatSpec(fn);
    delete t.filename;
    for (const [k, v] of Object.entries(parsed)) if (t[k] === undefined) t[k] = v;
  } else if (fn !== undefined && t.dir === undefined) {
    // driver=vvfat,filename=/some/dir: accept a plain directory as qemu's 'dir'
    t.dir = fn;
    delete t.filename;
  } else if (fn !== undefined) {
    throw new ImgError('usage', "vvfat: give either 'dir' or 'filename', not both");
  }
  if (t.file !== undefined) throw new ImgError('usage', 'vvfat: a virtual FAT disk has no file child');
  t = { ...t };
  const r = new OptionReader(t, 'vvfat');
  for (const k of GENERIC) r.markUsed(k);
  const dir = r.str('dir');
  if (!dir) throw new ImgError('usage', "vvfat: the 'dir' option is required");
  const ft = r.str('fat-type');
  let fatType: 0 | FatType = 0;
  if (ft !== undefined) {
    if (!['0', '12', '16', '32'].includes(ft)) throw new ImgError('usage', `vvfat: invalid fat-type '${ft}' (12, 16 or 32)`);
    fatType = Number(ft) as 0 | FatType;
  }
  const floppy = r.bool('floppy', false);
  const rw = r.bool('rw', false);
  const label = r.str('label') ?? 'QEMU VVFAT';
  r.finish();
  if (Buffer.byteLength(label, 'latin1') > 11 || !/^[\x20-\x7e]*$/.test(label)) {
    throw new ImgError('usage', `vvfat: label '${label}' must be at most 11 printable ASCII characters`);
  }
  const abs = path.resolve(dir);
  const t0 = Date.now();
  const layout = buildLayout({ dir: abs, fatType, floppy, label });
  debug('laid out %s: %d files, %d dirs, %d clusters in %d ms', abs, layout.fileCount, layout.dirCount, layout.usedClusters, Date.now() - t0);
  // read-only is the default (qemu): only rw makes the node writable
  const node = new VvfatNode(abs, layout, readOnly || !rw, label);
  node.baseline = initialBaseline(layout.root, layout.geo.fatType === 32);
  return node;
}
