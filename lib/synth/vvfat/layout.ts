// Scans a host directory and lays it out as a FAT file system: directory entries, a sorted
// table of cluster runs (cluster -> directory bytes or host file + offset) and the geometry.
// Only metadata is built here; file contents are read on demand by the node.
import fs from 'node:fs';
import path from 'node:path';
import createDebug from 'debug';
import { ImgError } from '../../core/errors';
import {
  assignShortNames, ATTR_ARCHIVE, ATTR_DIR, ATTR_RO, ATTR_VOLUME, exactShortName, lfnChecksum, lfnSlots,
  validLongName, writeLfn, writeShortEntry,
} from './names';

const debug = createDebug('imgmount:vvfat');

export type FatType = 12 | 16 | 32;

/** A host file whose bytes back some clusters. `path` is relative to the root (posix). */
export interface HostFile {
  rel: string;
  size: number;
  mtimeMs: number;
  mode: number;
  /** false once the host file was replaced or deleted by a commit */
  alive: boolean;
}

export interface ScanDir {
  rel: string;
  name: string;
  mtimeMs: number; atimeMs: number; ctimeMs: number;
  dirs: ScanDir[];
  files: ScanFile[];
  /** first cluster (0 = FAT12/16 root region) and cluster count */
  cluster: number;
  nClusters: number;
  /** entry bytes actually used (the rest of the directory's clusters read as zeros) */
  bytes: Buffer | null;
  entryCount: number;
}

export interface ScanFile {
  name: string;
  host: HostFile;
  atimeMs: number; ctimeMs: number;
  cluster: number;
  nClusters: number;
}

export interface Geometry {
  fatType: FatType;
  floppy: boolean;
  /** whole disk in sectors */
  totalSectors: number;
  /** partition start (0 for floppies) and length in sectors */
  partStart: number;
  partSectors: number;
  cyls: number; heads: number; secs: number;
  spc: number;
  reserved: number;
  spf: number;
  rootEntries: number; // 0 for FAT32
  rootSectors: number;
  /** first data sector, relative to the partition */
  dataStart: number;
  clusters: number; // number of data clusters (cluster numbers 2..clusters+1)
  media: number;
}

export interface Layout {
  geo: Geometry;
  root: ScanDir;
  /** sorted, non-overlapping runs of allocated clusters */
  runStart: Uint32Array;
  runLen: Uint32Array;
  /** index into owners */
  runOwner: Int32Array;
  /** byte offset (file) or byte offset into the directory buffer of the run's first cluster */
  runOffset: Float64Array;
  owners: Array<ScanDir | HostFile>;
  usedClusters: number;
  label: string;
  fileCount: number;
  dirCount: number;
}

const MAX_DIR_ENTRIES = 65536; // a FAT directory holds at most 65536 32-byte entries
const MAX_FILE_SIZE = 0xffffffff;
const HD_SPC = 16; // qemu's sectors per cluster for hard disks and floppies
const FAT32_SPC = 8; // 4 KiB clusters: a real FAT32 needs at least 65525 clusters

export interface LayoutOptions {
  dir: string;
  fatType: 0 | FatType;
  floppy: boolean;
  label: string;
}

interface Pending { dir: ScanDir; abs: string }

function isSpecialName(n: string): boolean { return n === '.' || n === '..'; }

const decoder = new TextDecoder('utf-8', { fatal: true });

/** Reads the whole tree (lstat only; symlinks and special files are skipped). */
export function scanTree(root: string): { root: ScanDir; files: number; dirs: number } {
  let st: fs.Stats;
  try {
    st = fs.statSync(root);
  } catch (e) {
    throw new ImgError('usage', `vvfat: cannot open directory '${root}': ${(e as NodeJS.ErrnoException).code ?? e}`);
  }
  if (!st.isDirectory()) throw new ImgError('usage', `vvfat: '${root}' is not a directory`);
  const top: ScanDir = mkDir('', '', st);
  const stack: Pending[] = [{ dir: top, abs: root }];
  let files = 0;
  let dirs = 1;
  while (stack.length) {
    const { dir, abs } = stack.pop()!;
    let ents: fs.Dirent<Buffer>[];
    try {
      ents = fs.readdirSync(abs, { withFileTypes: true, encoding: 'buffer' });
    } catch (e) {
      throw new ImgError('io', `vvfat: cannot read directory '${abs}': ${(e as NodeJS.ErrnoException).code ?? e}`);
    }
    const named: Array<{ name: string; ent: fs.Dirent<Buffer> }> = [];
    for (const ent of ents) {
      let name: string;
      try { name = decoder.decode(ent.name); } catch { debug('skipping non-UTF-8 name in %s', abs); continue; }
      if (isSpecialName(name)) continue;
      if (!validLongName(name)) { debug('skipping %s/%s: not a valid FAT long name', abs, name); continue; }
      if (!ent.isFile() && !ent.isDirectory()) { debug('skipping %s/%s: not a regular file or directory', abs, name); continue; }
      named.push({ name, ent });
    }
    named.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    // FAT names are case-insensitive: of 'Readme' and 'README' only the first is shown
    const seen = new Set<string>();
    for (const { name, ent } of named) {
      const key = name.toLowerCase();
      if (seen.has(key)) { debug('skipping %s/%s: differs from another name only in case', abs, name); continue; }
      seen.add(key);
      const p = path.join(abs, name);
      let s: fs.Stats;
      try { s = fs.lstatSync(p); } catch { continue; } // vanished meanwhile
      const rel = dir.rel ? `${dir.rel}/${name}` : name;
      if (ent.isDirectory() && s.isDirectory()) {
        const d = mkDir(rel, name, s);
        dir.dirs.push(d);
        stack.push({ dir: d, abs: p });
        dirs++;
      } else if (ent.isFile() && s.isFile()) {
        if (s.size > MAX_FILE_SIZE) throw new ImgError('image', `vvfat: '${p}' is larger than a FAT file can be (4 GiB - 1)`);
        dir.files.push({
          name,
          host: { rel, size: s.size, mtimeMs: s.mtimeMs, mode: s.mode, alive: true },
          atimeMs: s.atimeMs, ctimeMs: birth(s), cluster: 0, nClusters: 0,
        });
        files++;
      }
    }
  }
  return { root: top, files, dirs };
}

function birth(s: fs.Stats): number {
  return s.birthtimeMs > 0 ? s.birthtimeMs : s.ctimeMs;
}

function mkDir(rel: string, name: string, s: fs.Stats): ScanDir {
  return {
    rel, name, mtimeMs: s.mtimeMs, atimeMs: s.atimeMs, ctimeMs: birth(s), dirs: [], files: [],
    cluster: 0, nClusters: 0, bytes: null, entryCount: 0,
  };
}

/** number of 32-byte entries the directory needs */
function entriesOf(dir: ScanDir, isRoot: boolean): { count: number; shorts: string[]; names: string[] } {
  const names = [...dir.dirs.map((d) => d.name), ...dir.files.map((f) => f.name)];
  const shorts = assignShortNames(names);
  let count = isRoot ? 1 : 2; // volume label, or . and ..
  names.forEach((n, i) => { count += 1 + (needsLfn(n, shorts[i]) ? lfnSlots(n) : 0); });
  return { count, shorts, names };
}

function needsLfn(name: string, short: string): boolean {
  return exactShortName(name) !== short;
}

export function fatGeometry(o: LayoutOptions, neededClusters: number): Geometry {
  let fatType: FatType;
  if (o.floppy) {
    if (o.fatType === 32) throw new ImgError('usage', 'vvfat: a floppy cannot be FAT32 (use fat:floppy:12: or fat:floppy:16:)');
    fatType = o.fatType === 16 ? 16 : 12;
    // qemu: 1.44 MB when FAT12 is asked for, 2.88 MB otherwise
    const secs = o.fatType === 12 ? 18 : 36;
    // qemu 7.2 uses 16 sectors per cluster everywhere; a 2.88 MB FAT16 then has too few clusters
    // to be FAT16 (fsck.fat rejects it), so FAT16 floppies get one sector per cluster.
    const spc = fatType === 16 ? 1 : HD_SPC;
    return smallGeometry(fatType, true, 80, 2, secs, spc);
  }
  fatType = o.fatType === 0 ? 16 : o.fatType;
  if (fatType !== 32) return smallGeometry(fatType, false, fatType === 12 ? 64 : 1024, 16, 63, HD_SPC);
  // FAT32: at least qemu's 504 MB, grown to the content with a quarter to spare
  const heads = 16;
  const secs = 63;
  const spc = FAT32_SPC;
  const reserved = 32;
  const want = Math.max(neededClusters + Math.ceil(neededClusters / 4) + 1024, 0);
  const minSectors = 1024 * heads * secs;
  let partSectors = Math.max(minSectors - 63, 0);
  // data clusters for want, plus FATs
  const spfFor = (c: number): number => Math.ceil(((c + 2) * 4) / 512);
  const needSectors = reserved + 2 * spfFor(want) + want * spc;
  if (needSectors > partSectors) partSectors = needSectors;
  const cylSize = heads * secs;
  let totalSectors = Math.ceil((partSectors + 63) / cylSize) * cylSize;
  partSectors = totalSectors - 63;
  let spf = spfFor(Math.ceil(partSectors / spc));
  let clusters = Math.floor((partSectors - reserved - 2 * spf) / spc);
  if (clusters > 0x0ffffff5 || totalSectors > 0xffffffff) {
    throw new ImgError('image', `vvfat: the directory is too large for a FAT32 disk (${neededClusters} clusters needed)`);
  }
  spf = spfFor(clusters);
  // a smaller FAT leaves room for a few more clusters, but never more than it can describe
  clusters = Math.min(Math.floor((partSectors - reserved - 2 * spf) / spc), (spf * 512) / 4 - 2);
  return {
    fatType: 32, floppy: false, totalSectors, partStart: 63, partSectors,
    cyls: totalSectors / cylSize, heads, secs, spc, reserved, spf, rootEntries: 0, rootSectors: 0,
    dataStart: reserved + 2 * spf, clusters, media: 0xf8,
  };
}

function smallGeometry(fatType: FatType, floppy: boolean, cyls: number, heads: number, secs: number, spc: number): Geometry {
  const totalSectors = cyls * heads * secs;
  const partStart = floppy ? 0 : 63;
  const partSectors = totalSectors - partStart;
  const reserved = 1;
  const rootEntries = 512;
  const rootSectors = (rootEntries * 32) / 512;
  // qemu's formula: sectors = spf + 1 + spf * spc * (512 * 8 / fat_type), rounded up
  const i = 1 + Math.floor((spc * 512 * 8) / fatType);
  const spf = Math.floor((partSectors + i) / i);
  const dataStart = reserved + 2 * spf + rootSectors;
  let clusters = Math.floor((partSectors - dataStart) / spc);
  const fatEntries = Math.floor((spf * 512 * 8) / fatType) - 2;
  clusters = Math.min(clusters, fatEntries, fatType === 12 ? 4084 : 65524);
  return {
    fatType, floppy, totalSectors, partStart, partSectors, cyls, heads, secs, spc, reserved, spf,
    rootEntries, rootSectors, dataStart, clusters, media: floppy ? 0xf0 : 0xf8,
  };
}

/** Builds the layout of a scanned tree. */
export function buildLayout(o: LayoutOptions): Layout {
  const scan = scanTree(o.dir);
  const root = scan.root;
  // first pass: entries and cluster counts per directory (cluster size depends on the type)
  const probeGeo = fatGeometry(o, 0);
  const cs = probeGeo.spc * 512;
  const is32 = probeGeo.fatType === 32;
  const dirInfo = new Map<ScanDir, { shorts: string[]; names: string[] }>();
  let needed = 0;
  const all: ScanDir[] = [];
  const walk: ScanDir[] = [root];
  while (walk.length) {
    const d = walk.pop()!;
    all.push(d);
    const isRoot = d === root;
    const { count, shorts, names } = entriesOf(d, isRoot);
    if (count > MAX_DIR_ENTRIES) {
      throw new ImgError('image', `vvfat: directory '${d.rel || '/'}' has too many entries for FAT (${count} > ${MAX_DIR_ENTRIES})`);
    }
    if (isRoot && !is32 && count > probeGeo.rootEntries) {
      throw new ImgError('image', `vvfat: the root directory needs ${count} entries, FAT${probeGeo.fatType} allows ${probeGeo.rootEntries} (use fat:32: or subdirectories)`);
    }
    d.entryCount = count;
    dirInfo.set(d, { shorts, names });
    if (!isRoot || is32) { d.nClusters = Math.max(1, Math.ceil((count * 32) / cs)); needed += d.nClusters; }
    for (const f of d.files) { f.nClusters = Math.ceil(f.host.size / cs); needed += f.nClusters; }
    for (let k = d.dirs.length - 1; k >= 0; k--) walk.push(d.dirs[k]);
  }
  const geo = is32 ? fatGeometry(o, needed) : probeGeo;
  if (needed > geo.clusters) {
    const cap = (geo.clusters * cs) / 1048576;
    throw new ImgError('image', `vvfat: the directory does not fit in FAT${geo.fatType}${geo.floppy ? ' floppy' : ''} (needs ${needed} clusters, ${geo.clusters} available, ${cap.toFixed(1)} MiB)${geo.fatType === 32 ? '' : '; try fat:32:'}`);
  }
  // second pass: allocate clusters (preorder: a directory, its files, then its subdirectories)
  const nRunsMax = all.length + scan.files;
  const runStart = new Uint32Array(nRunsMax);
  const runLen = new Uint32Array(nRunsMax);
  const runOwner = new Int32Array(nRunsMax);
  const runOffset = new Float64Array(nRunsMax);
  const owners: Array<ScanDir | HostFile> = [];
  let nRuns = 0;
  let next = 2;
  const addRun = (n: number, owner: ScanDir | HostFile): number => {
    const start = next;
    runStart[nRuns] = start; runLen[nRuns] = n; runOwner[nRuns] = owners.length; runOffset[nRuns] = 0;
    owners.push(owner);
    nRuns++;
    next += n;
    return start;
  };
  for (const d of all) {
    if (d.nClusters) d.cluster = addRun(d.nClusters, d);
    for (const f of d.files) if (f.nClusters) f.cluster = addRun(f.nClusters, f.host);
  }
  // third pass: directory bytes (needs the clusters of children and parents)
  const parent = new Map<ScanDir, ScanDir>();
  for (const d of all) for (const c of d.dirs) parent.set(c, d);
  for (const d of all) {
    const info = dirInfo.get(d)!;
    const buf = Buffer.alloc(d.entryCount * 32);
    let p = 0;
    if (d === root) {
      const lbl = Buffer.alloc(11, 0x20);
      lbl.write(o.label, 'latin1');
      lbl.copy(buf, 0);
      buf[11] = ATTR_ARCHIVE | ATTR_VOLUME;
      writeTimes(buf, 0, d);
      p = 32;
    } else {
      const par = parent.get(d)!;
      writeShortEntry(buf, p, { short: '.          ', attr: ATTR_DIR, cluster: d.cluster, size: 0, mtimeMs: d.mtimeMs, atimeMs: d.atimeMs, ctimeMs: d.ctimeMs });
      p += 32;
      writeShortEntry(buf, p, { short: '..         ', attr: ATTR_DIR, cluster: par === root ? 0 : par.cluster, size: 0, mtimeMs: par.mtimeMs, atimeMs: par.atimeMs, ctimeMs: par.ctimeMs });
      p += 32;
    }
    const items: Array<{ name: string; attr: number; cluster: number; size: number; m: number; a: number; c: number }> = [
      ...d.dirs.map((c) => ({ name: c.name, attr: ATTR_DIR, cluster: c.cluster, size: 0, m: c.mtimeMs, a: c.atimeMs, c: c.ctimeMs })),
      ...d.files.map((f) => ({
        name: f.name, attr: ATTR_ARCHIVE | ((f.host.mode & 0o222) === 0 ? ATTR_RO : 0), cluster: f.cluster,
        size: f.host.size, m: f.host.mtimeMs, a: f.atimeMs, c: f.ctimeMs,
      })),
    ];
    items.forEach((it, i) => {
      const short = info.shorts[i];
      if (needsLfn(it.name, short)) p += writeLfn(buf, p, it.name, lfnChecksum(short));
      writeShortEntry(buf, p, { short, attr: it.attr, cluster: it.cluster, size: it.size, mtimeMs: it.m, atimeMs: it.a, ctimeMs: it.c });
      p += 32;
    });
    d.bytes = buf;
  }
  return {
    geo, root, runStart: runStart.subarray(0, nRuns), runLen: runLen.subarray(0, nRuns), runOwner: runOwner.subarray(0, nRuns),
    runOffset: runOffset.subarray(0, nRuns), owners, usedClusters: needed, label: o.label, fileCount: scan.files, dirCount: scan.dirs,
  };
}

function writeTimes(buf: Buffer, p: number, d: ScanDir): void {
  // the volume label entry carries the modification time only
  const tmp = Buffer.alloc(32);
  writeShortEntry(tmp, 0, { short: '           ', attr: 0, cluster: 0, size: 0, mtimeMs: d.mtimeMs, atimeMs: d.mtimeMs, ctimeMs: d.mtimeMs });
  tmp.copy(buf, p + 22, 22, 26);
}

/** index of the run containing cluster c, or -1 */
export function findRun(runStart: Uint32Array, runLen: Uint32Array, c: number): number {
  let lo = 0;
  let hi = runStart.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (runStart[mid] > c) hi = mid - 1;
    else if (runStart[mid] + runLen[mid] <= c) lo = mid + 1;
    else return mid;
  }
  return -1;
}

/** index of the first run ending after cluster c (runs.length when none) */
export function firstRunFrom(runStart: Uint32Array, runLen: Uint32Array, c: number): number {
  let lo = 0;
  let hi = runStart.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (runStart[mid] + runLen[mid] <= c) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
