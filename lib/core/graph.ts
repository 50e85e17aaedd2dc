// Builds the node graph from what the user gave: a filename, json:{...}, --image-opts, or
// dotted -o options, following qemu's blockdev-options names.
import fs from 'node:fs';
import path from 'node:path';
import createDebug from 'debug';
import { ImgError } from './errors';
import type { BlockNode, OpenContext } from './node';
import { cloneTree, mergeTrees, OptionReader, OptionTree, parseBool, parseJsonFilename, parseOptionString } from './options';
import { SecretStore } from './secrets';
import type { LockMode } from './lock';
import { findDriver, probeFormat, PROBE_TAIL } from '../formats';
import { FileNode } from '../protocols/file';
import { openVvfat } from '../synth/vvfat';

const debug = createDebug('imgmount:graph');

export type CacheMode = 'writeback' | 'writethrough' | 'none' | 'directsync' | 'unsafe';
export const CACHE_MODES: CacheMode[] = ['writeback', 'writethrough', 'none', 'directsync', 'unsafe'];

export interface OpenOptions {
  format?: string;
  /** -o options, merged over what the filename says */
  options?: OptionTree;
  /** the image argument is a full option string (--image-opts) */
  imageOpts?: boolean;
  readOnly?: boolean;
  secrets?: SecretStore;
  locking?: LockMode;
  shareRw?: boolean;
  cache?: CacheMode;
  /** open without the backing chain (qemu-img's -u and info without --backing-chain need it) */
  noBacking?: boolean;
  /** an already opened node to use as the top image's backing (snapshot mode's overlay) */
  backingNode?: BlockNode;
  /** only metadata will be read (info): encrypted images open without their secret */
  headerOnly?: boolean;
}

const PROTOCOLS = new Set(['file', 'host_device']);
const NETWORK = /^(nbd|nbd\+unix|nbd\+tcp|ssh|iscsi|iser|gluster|gluster\+tcp|gluster\+unix|gluster\+rdma|nvme|http|https|ftp|ftps):/;
const MAX_DEPTH = 64;

/** The option tree for a user-given image argument. */
export function imageTree(spec: string, o: OpenOptions = {}): OptionTree {
  let tree: OptionTree;
  if (o.imageOpts) tree = parseOptionString(spec);
  else if (spec.startsWith('json:')) tree = parseJsonFilename(spec);
  else tree = { filename: spec };
  if (o.options) mergeTrees(tree, o.options);
  if (o.format) {
    if (typeof tree.driver === 'string' && tree.driver !== o.format) {
      throw new ImgError('usage', `format '${o.format}' conflicts with driver '${tree.driver}' given in the image options`);
    }
    tree.driver = o.format;
  }
  return tree;
}

interface Ctx {
  secrets: SecretStore;
  locking: LockMode;
  shareRw: boolean;
  cache: CacheMode;
  noBacking: boolean;
  depth: number;
  opened: Set<string>;
  backingNode?: BlockNode;
  headerOnly?: boolean;
}

export async function openImage(spec: string, o: OpenOptions = {}): Promise<BlockNode> {
  const tree = imageTree(spec, o);
  const ctx: Ctx = {
    secrets: o.secrets ?? new SecretStore(),
    locking: o.locking ?? 'auto',
    shareRw: o.shareRw ?? false,
    cache: o.cache ?? 'writeback',
    noBacking: o.noBacking ?? false,
    depth: 0,
    opened: new Set(),
    backingNode: o.backingNode,
    headerOnly: o.headerOnly,
  };
  return openTree(tree, ctx, !!o.readOnly, 'image');
}

function str(t: OptionTree, k: string): string | undefined {
  const v = t[k];
  return typeof v === 'string' ? v : undefined;
}

function cacheFlags(tree: OptionTree, mode: CacheMode): { direct: boolean; noFlush: boolean; writethrough: boolean } {
  const f = {
    direct: mode === 'none' || mode === 'directsync',
    noFlush: mode === 'unsafe',
    writethrough: mode === 'writethrough' || mode === 'directsync',
  };
  const c = tree.cache;
  if (c && typeof c !== 'string') {
    if (typeof c.direct === 'string') f.direct = parseBool(c.direct, 'cache.direct');
    if (typeof c['no-flush'] === 'string') f.noFlush = parseBool(c['no-flush'], 'cache.no-flush');
  }
  return f;
}

// Keys every node accepts (qemu's generic blockdev options); a format never sees them.
const GENERIC = ['driver', 'file', 'filename', 'node-name', 'read-only', 'auto-read-only', 'cache', 'discard',
  'detect-zeroes', 'force-share', 'backing'];

async function openTree(tree: OptionTree, ctx: Ctx, readOnly: boolean, role: 'image' | 'backing'): Promise<BlockNode> {
  if (ctx.depth > MAX_DEPTH) throw new ImgError('image', `backing chain is deeper than ${MAX_DEPTH} images`);
  if (typeof tree['read-only'] === 'string' && parseBool(tree['read-only'], 'read-only')) readOnly = true;
  const shareRw = ctx.shareRw || (typeof tree['force-share'] === 'string' && parseBool(tree['force-share'], 'force-share'));
  let driver = str(tree, 'driver');
  const filename = str(tree, 'filename');
  if (filename !== undefined && driver === undefined) {
    if (filename.startsWith('fat:')) return openVvfat(tree, readOnly);
    if (NETWORK.test(filename)) throw new ImgError('unsupported', `${filename}: network sources are not supported yet`);
  }
  if (driver === 'vvfat') return openVvfat(tree, readOnly);
  if (driver !== undefined && PROTOCOLS.has(driver)) {
    return openProtocol(tree, ctx, readOnly, role, shareRw);
  }
  const fileTree = fileTreeOf(tree, driver, filename);
  const file = await openTree(fileTree, ctx, readOnly, role);
  try {
    let drv;
    const probed = driver === undefined;
    if (driver === undefined) {
      const head = Buffer.alloc(Math.min(65536, Math.max(0, file.size)));
      if (head.length) await file.read(head, 0);
      const tail = Buffer.alloc(Math.min(PROBE_TAIL, Math.max(0, file.size)));
      if (tail.length) await file.read(tail, file.size - tail.length);
      drv = probeFormat(head, file.filename, tail, file.size);
      driver = drv.name;
      debug('probed %s as %s', file.filename, driver);
    } else {
      drv = findDriver(driver);
    }
    const fmtOptions: OptionTree = {};
    for (const [k, v] of Object.entries(tree)) if (!GENERIC.includes(k)) fmtOptions[k] = v;
    const backingOpt = tree.backing;
    const imageName = file.filename;
    const openCtx: OpenContext = {
      options: fmtOptions,
      readOnly,
      secrets: ctx.secrets,
      filename: imageName,
      probed,
      headerOnly: ctx.headerOnly,
      openBacking: async (bname, bfmt) => {
        if (ctx.backingNode && ctx.depth === 0) return ctx.backingNode;
        if (ctx.noBacking || backingOpt === 'null') return null;
        let bt: OptionTree;
        if (backingOpt !== undefined && typeof backingOpt !== 'string') {
          bt = cloneTree(backingOpt);
          if (bt.filename === undefined && bt.file === undefined && bname) bt.filename = resolveRelative(bname, imageName);
        } else if (typeof backingOpt === 'string') {
          bt = { filename: backingOpt };
        } else {
          if (!bname) return null;
          bt = bname.startsWith('json:') ? parseJsonFilename(bname) : { filename: resolveRelative(bname, imageName) };
        }
        if (bfmt && bt.driver === undefined) bt.driver = bfmt;
        const key = JSON.stringify(bt);
        if (ctx.opened.has(key)) throw new ImgError('image', `backing chain of '${imageName}' contains a loop`);
        ctx.opened.add(key);
        ctx.depth++;
        try {
          return await openTree(bt, ctx, true, 'backing');
        } catch (e) {
          if (e instanceof ImgError) throw new ImgError(e.kind, `Could not open backing file: ${e.message}`, e);
          throw e;
        } finally {
          ctx.depth--;
        }
      },
      openChild: async (key, cname, cfmt, ro) => {
        const over = tree[key];
        const ct: OptionTree = over && typeof over !== 'string' ? cloneTree(over) : {};
        if (ct.filename === undefined && ct.file === undefined) ct.filename = resolveRelative(cname, imageName);
        if (cfmt && ct.driver === undefined) ct.driver = cfmt;
        return openTree(ct, ctx, ro || readOnly, role);
      },
    };
    return await drv.open(file, openCtx);
  } catch (e) {
    await file.close().catch(() => undefined);
    throw e;
  }
}

/** The protocol subtree of a format's options: file=<tree>|<filename>, or the top-level filename. */
function fileTreeOf(tree: OptionTree, driver: string | undefined, filename: string | undefined): OptionTree {
  let fileTree: OptionTree;
  const f = tree.file;
  if (f === undefined) {
    if (filename === undefined) throw new ImgError('usage', `${driver ?? 'image'}: no filename given (file.filename=...)`);
    fileTree = { filename };
  } else if (typeof f === 'string') {
    fileTree = { filename: f };
  } else {
    fileTree = cloneTree(f);
    if (filename !== undefined && fileTree.filename === undefined) fileTree.filename = filename;
  }
  if (fileTree.driver === undefined) fileTree.driver = 'file';
  if (fileTree.cache === undefined && tree.cache !== undefined) fileTree.cache = tree.cache;
  return fileTree;
}

/** Opens only the protocol node under an image (check and repair work on it directly). */
export async function openProtocolOf(spec: string, o: OpenOptions = {}): Promise<BlockNode> {
  const tree = imageTree(spec, o);
  const driver = str(tree, 'driver');
  if (driver !== undefined && PROTOCOLS.has(driver)) throw new ImgError('usage', `${spec}: no image format over the ${driver} protocol`);
  const ctx: Ctx = { secrets: o.secrets ?? new SecretStore(), locking: o.locking ?? 'auto', shareRw: o.shareRw ?? false,
    cache: o.cache ?? 'writeback', noBacking: true, depth: 0, opened: new Set() };
  return openTree(fileTreeOf(tree, driver, str(tree, 'filename')), ctx, !!o.readOnly, 'image');
}

/** qemu resolves a relative backing filename against the directory of the image that names it. */
export function resolveRelative(name: string, base: string): string {
  if (path.isAbsolute(name) || /^[a-z+]+:/.test(name)) return name;
  return path.join(path.dirname(base), name);
}

const FILE_KEYS = ['driver', 'filename', 'locking', 'aio', 'aio-max-batch', 'cache', 'node-name', 'read-only',
  'auto-read-only', 'discard', 'detect-zeroes', 'force-share', 'x-check-cache-dropped', 'drop-cache', 'pr-manager'];

async function openProtocol(tree: OptionTree, ctx: Ctx, readOnly: boolean, role: 'image' | 'backing', shareRw: boolean): Promise<BlockNode> {
  const r = new OptionReader(tree, str(tree, 'driver') ?? 'file');
  for (const k of FILE_KEYS) r.markUsed(k);
  r.finish();
  const filename = str(tree, 'filename');
  if (!filename) throw new ImgError('usage', 'file: missing filename');
  if (!fs.existsSync(filename)) {
    throw new ImgError('usage', `Could not open '${filename}': No such file or directory`);
  }
  const lockOpt = str(tree, 'locking');
  const locking = (lockOpt ?? ctx.locking) as LockMode;
  if (!['on', 'off', 'auto'].includes(locking)) throw new ImgError('usage', `invalid locking mode '${locking}' (on, off, auto)`);
  const c = cacheFlags(tree, ctx.cache);
  return FileNode.open({ filename, readOnly, ...c, locking, shareRw, role });
}

/** Closes a node and everything below it, each once. */
export async function closeAll(node: BlockNode): Promise<void> {
  await node.close();
}
