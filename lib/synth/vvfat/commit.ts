// Write-back of a writable virtual FAT disk: parse the guest's FAT state (base + overlay),
// check it completely, then bring the host directory in line (new, modified, deleted,
// renamed files and directories), replacing each host file atomically (temp file + rename).
// Nothing reaches the host unless the whole state is consistent.
import fs from 'node:fs';
import path from 'node:path';
import createDebug from 'debug';
import { ImgError, ioError } from '../../core/errors';
import { findRun, HostFile, ScanDir } from './layout';
import {
  ATTR_DIR, ATTR_LFN, ATTR_RO, ATTR_VOLUME, dosTime, fromDosTime, LFN_OFFSETS, lfnChecksum,
} from './names';
import type { DataRun, VvfatNode } from './node';
import { eocMin, fatEntry } from './sectors';

const debug = createDebug('imgmount:vvfat');
const SECTOR = 512;
const MAX_DIR_BYTES = 65536 * 32;
const TMP_PREFIX = '.vvfat-';

interface GDir {
  name: string;
  rel: string;
  cluster: number; // 0 for the FAT12/16 root
  chain: number[];
  dirs: GDir[];
  files: GFile[];
}

interface GFile {
  name: string;
  rel: string;
  chain: number[];
  size: number;
  attr: number;
  mtimeMs: number | null;
  atimeMs: number | null;
  /** set by planning: the host file that already holds this content */
  keep?: HostFile;
}

/** What the node knows the host directory holds (the state after the last commit). */
export interface Baseline {
  /** directory identity (first cluster; root = -1) -> rel */
  dirs: Map<number, string>;
  /** rel -> host file */
  files: Map<string, HostFile>;
}

export function initialBaseline(root: ScanDir, is32: boolean): Baseline {
  const dirs = new Map<number, string>();
  const files = new Map<string, HostFile>();
  const walk = (d: ScanDir, isRoot: boolean): void => {
    dirs.set(isRoot ? -1 : d.cluster, d.rel);
    for (const f of d.files) files.set(f.host.rel, f.host);
    for (const c of d.dirs) walk(c, false);
  };
  void is32;
  walk(root, true);
  return { dirs, files };
}

function bad(why: string): ImgError {
  return new ImgError('image', `vvfat: cannot write back to the host directory: ${why}`);
}

/** A host-valid, FAT-valid name that stays inside its directory. */
export function checkGuestName(name: string, where: string): void {
  if (name.length === 0) throw bad(`empty file name in ${where}`);
  if (name === '.' || name === '..') throw bad(`invalid file name '${name}' in ${where}`);
  for (let i = 0; i < name.length; i++) {
    const c = name.charCodeAt(i);
    if (c < 0x20 || c === 0x7f) throw bad(`file name with a control character in ${where}`);
    if (c === 0x2f || c === 0x5c) throw bad(`file name '${name}' contains a path separator in ${where}`);
    if (c >= 0xd800 && c <= 0xdbff) {
      const d = name.charCodeAt(i + 1);
      if (!(d >= 0xdc00 && d <= 0xdfff)) throw bad(`invalid UTF-16 in a long file name in ${where}`);
      i++;
    } else if (c >= 0xdc00 && c <= 0xdfff) throw bad(`invalid UTF-16 in a long file name in ${where}`);
  }
  if (Buffer.byteLength(name, 'utf8') > 255) throw bad(`file name too long in ${where}`);
  if (name.startsWith(TMP_PREFIX)) throw bad(`file name '${name}' is reserved in ${where}`);
}

class Parser {
  readonly g;
  readonly cs: number;
  readonly fat: Buffer;
  readonly owner: Int32Array;
  private chainId = 0;
  constructor(private node: VvfatNode, fat: Buffer) {
    this.g = node.geo;
    this.cs = node.cs;
    this.fat = fat;
    this.owner = new Int32Array(this.g.clusters + 2);
  }

  /** follows a chain: in range, no free or bad clusters, no loops, no cross-links */
  chain(start: number, maxLen: number, what: string): number[] {
    const g = this.g;
    const id = ++this.chainId;
    const out: number[] = [];
    const eoc = eocMin(g.fatType);
    let c = start;
    for (;;) {
      if (c < 2 || c >= g.clusters + 2) throw bad(`${what}: cluster ${c} is out of range`);
      if (this.owner[c] === id) throw bad(`${what}: cluster chain loops at cluster ${c}`);
      if (this.owner[c] !== 0) throw bad(`${what}: cluster ${c} is cross-linked with another file`);
      this.owner[c] = id;
      out.push(c);
      if (out.length > maxLen) throw bad(`${what}: cluster chain is longer than its size allows`);
      const v = fatEntry(g.fatType, this.fat, c);
      if (v >= eoc) break;
      if (v === 0) throw bad(`${what}: cluster chain runs into free cluster ${c}`);
      if (v === eoc - 1) throw bad(`${what}: cluster chain contains a bad cluster`);
      c = v;
    }
    return out;
  }

  async readChain(chain: number[]): Promise<Buffer> {
    const buf = Buffer.alloc(chain.length * this.cs);
    let i = 0;
    while (i < chain.length) {
      let j = i + 1;
      while (j < chain.length && chain[j] === chain[j - 1] + 1 && (j - i) * this.cs < (1 << 20)) j++;
      await this.node.readView(buf.subarray(i * this.cs, j * this.cs), this.node.clusterOffset(chain[i]));
      i = j;
    }
    return buf;
  }

  async parseDir(dir: GDir, parentCluster: number, isRoot: boolean): Promise<Array<{ dir: GDir; start: number; data: Buffer }>> {
    let data: Buffer;
    const where = `'/${dir.rel}'`;
    if (isRoot && this.g.fatType !== 32) {
      data = Buffer.alloc(this.g.rootSectors * SECTOR);
      await this.node.readView(data, (this.g.partStart + this.g.reserved + 2 * this.g.spf) * SECTOR);
    } else {
      const chain = this.chain(dir.cluster, Math.ceil(MAX_DIR_BYTES / this.cs), `directory ${where}`);
      dir.chain = chain;
      data = await this.readChain(chain);
    }
    const sub: Array<{ dir: GDir; start: number; data: Buffer }> = [];
    const seen = new Set<string>();
    let lfn: { count: number; sum: number; next: number; units: number[] } | null = null;
    for (let p = 0; p + 32 <= data.length; p += 32) {
      const b0 = data[p];
      if (b0 === 0) break;
      if (b0 === 0xe5) { lfn = null; continue; }
      const attr = data[p + 11];
      if (attr === ATTR_LFN) {
        const ord = b0 & 0x1f;
        if (b0 & 0x40) {
          lfn = ord >= 1 && ord <= 20 ? { count: ord, sum: data[p + 13], next: ord, units: new Array(ord * 13).fill(0xffff) } : null;
        }
        if (lfn && ord === lfn.next && data[p + 13] === lfn.sum) {
          for (let k = 0; k < 13; k++) lfn.units[(ord - 1) * 13 + k] = data.readUInt16LE(p + LFN_OFFSETS[k]);
          lfn.next = ord - 1;
        } else {
          lfn = null;
        }
        continue;
      }
      if (attr & ATTR_VOLUME) { lfn = null; continue; }
      const short = data.subarray(p, p + 11);
      const shortStr = short.toString('latin1');
      const hi = this.g.fatType === 32 ? data.readUInt16LE(p + 20) : 0;
      const start = (hi << 16) | data.readUInt16LE(p + 26);
      const size = data.readUInt32LE(p + 28);
      if (shortStr === '.          ' || shortStr === '..         ') {
        if (isRoot) throw bad(`'${shortStr.trim()}' entry in the root directory`);
        const want = shortStr === '.          ' ? dir.cluster : parentCluster;
        if (start !== want) throw bad(`'${shortStr.trim()}' entry of ${where} points to the wrong cluster`);
        lfn = null;
        continue;
      }
      let name: string;
      if (lfn && lfn.next === 0 && lfn.sum === lfnChecksum(short)) {
        const end = lfn.units.indexOf(0);
        const units = end >= 0 ? lfn.units.slice(0, end) : lfn.units.filter((u) => u !== 0xffff);
        name = String.fromCharCode(...units);
      } else {
        name = shortName(short, data[p + 12]);
      }
      lfn = null;
      checkGuestName(name, where);
      const key = name.toLowerCase();
      if (seen.has(key)) throw bad(`two entries named '${name}' in ${where}`);
      seen.add(key);
      const rel = dir.rel ? `${dir.rel}/${name}` : name;
      if (attr & ATTR_DIR) {
        if (start === 0) throw bad(`directory '/${rel}' has no clusters`);
        const d: GDir = { name, rel, cluster: start, chain: [], dirs: [], files: [] };
        dir.dirs.push(d);
        sub.push({ dir: d, start, data });
      } else {
        const need = Math.ceil(size / this.cs);
        let chain: number[] = [];
        if (size === 0) {
          if (start !== 0) throw bad(`empty file '/${rel}' has clusters allocated`);
        } else {
          if (start === 0) throw bad(`file '/${rel}' of ${size} bytes has no clusters`);
          chain = this.chain(start, need, `file '/${rel}'`);
          if (chain.length !== need) throw bad(`file '/${rel}': size ${size} does not match its ${chain.length} clusters`);
        }
        const mdate = data.readUInt16LE(p + 24);
        const mtime = data.readUInt16LE(p + 22);
        const adate = data.readUInt16LE(p + 18);
        dir.files.push({
          name, rel, chain, size, attr,
          mtimeMs: mdate ? fromDosTime(mdate, mtime) : null,
          atimeMs: adate ? fromDosTime(adate, 0) : null,
        });
      }
    }
    return sub;
  }
}

function shortName(short: Uint8Array, caseBits: number): string {
  const bytes = Buffer.from(short);
  if (bytes[0] === 0x05) bytes[0] = 0xe5;
  let base = bytes.subarray(0, 8).toString('latin1').replace(/ +$/, '');
  let ext = bytes.subarray(8, 11).toString('latin1').replace(/ +$/, '');
  if (caseBits & 0x08) base = base.toLowerCase();
  if (caseBits & 0x10) ext = ext.toLowerCase();
  return ext ? `${base}.${ext}` : base;
}

/** Parses and validates the whole guest file system. */
async function parseGuest(node: VvfatNode): Promise<{ root: GDir; parser: Parser }> {
  const g = node.geo;
  // the boot sector must still describe our geometry
  const boot = Buffer.alloc(SECTOR);
  await node.readView(boot, g.partStart * SECTOR);
  const ours = Buffer.alloc(SECTOR);
  await node.readBase(ours, g.partStart * SECTOR);
  const cmpEnd = g.fatType === 32 ? 0x30 : 0x24;
  if (!boot.subarray(0x0b, cmpEnd).equals(ours.subarray(0x0b, cmpEnd))) {
    throw bad('the boot sector no longer describes the virtual disk (was it reformatted?)');
  }
  const fat = Buffer.alloc(g.spf * SECTOR);
  await node.readView(fat, (g.partStart + g.reserved) * SECTOR);
  const parser = new Parser(node, fat);
  const root: GDir = { name: '', rel: '', cluster: g.fatType === 32 ? node.layout.root.cluster : 0, chain: [], dirs: [], files: [] };
  const queue: Array<{ dir: GDir; parent: number; isRoot: boolean }> = [{ dir: root, parent: 0, isRoot: true }];
  while (queue.length) {
    const { dir, parent, isRoot } = queue.shift()!;
    const sub = await parser.parseDir(dir, parent, isRoot);
    // '..' of a directory in the root is 0, also on FAT32
    for (const s of sub) queue.push({ dir: s.dir, parent: isRoot ? 0 : dir.cluster, isRoot: false });
  }
  return { root, parser };
}

interface Plan {
  dirs: Array<{ g: GDir; from: string | null }>; // from: baseline rel of the same directory
  files: GFile[];
  deletedFiles: HostFile[];
  deletedDirs: string[];
}

function sourceOf(node: VvfatNode, c: number): { file: HostFile; offset: number } | null {
  if (node.dataRuns) {
    const dr = node.findDataRun(c);
    if (dr) return { file: dr.file, offset: dr.offset + (c - dr.start) * node.cs };
  }
  const L = node.layout;
  const i = findRun(L.runStart, L.runLen, c);
  if (i < 0) return null;
  const o = L.owners[L.runOwner[i]];
  if ('dirs' in o) return null;
  return { file: o, offset: L.runOffset[i] + (c - L.runStart[i]) * node.cs };
}

function clusterOverlaid(node: VvfatNode, c: number): boolean {
  const s0 = node.clusterOffset(c) / SECTOR;
  for (let s = s0; s < s0 + node.geo.spc; s++) if (node.overlay.has(s)) return true;
  return false;
}

/** the host file that holds exactly this guest file's bytes, if any */
function cleanSource(node: VvfatNode, f: GFile, base: Baseline, claimed: Set<HostFile>): HostFile | null {
  if (f.size === 0) {
    const hf = base.files.get(f.rel);
    return hf && hf.size === 0 && hf.alive && !claimed.has(hf) ? hf : null;
  }
  let hf: HostFile | null = null;
  for (let i = 0; i < f.chain.length; i++) {
    const c = f.chain[i];
    if (clusterOverlaid(node, c)) return null;
    const s = sourceOf(node, c);
    if (!s || s.offset !== i * node.cs || (hf && s.file !== hf)) return null;
    hf = s.file;
  }
  if (!hf || !hf.alive || hf.size !== f.size || claimed.has(hf)) return null;
  return hf;
}

function plan(node: VvfatNode, root: GDir, base: Baseline): Plan {
  const dirs: Plan['dirs'] = [];
  const files: GFile[] = [];
  const claimed = new Set<HostFile>();
  const matchedDirs = new Set<string>();
  const walk = (d: GDir, isRoot: boolean): void => {
    const from = isRoot ? '' : base.dirs.get(d.cluster) ?? null;
    if (from !== null) matchedDirs.add(from);
    dirs.push({ g: d, from });
    for (const f of d.files) {
      const hf = cleanSource(node, f, base, claimed);
      if (hf) { claimed.add(hf); f.keep = hf; }
      files.push(f);
    }
    for (const c of d.dirs) walk(c, false);
  };
  walk(root, true);
  const deletedFiles = [...base.files.values()].filter((hf) => !claimed.has(hf));
  const deletedDirs = [...base.dirs.values()].filter((rel) => rel !== '' && !matchedDirs.has(rel));
  return { dirs, files, deletedFiles, deletedDirs };
}

const depth = (rel: string): number => (rel ? rel.split('/').length : 0);

export async function commit(node: VvfatNode): Promise<void> {
  const t0 = Date.now();
  const { root } = await parseGuest(node);
  const base = node.baseline;
  const p = plan(node, root, base);
  const host = (rel: string): string => (rel ? path.join(node.root, ...rel.split('/')) : node.root);

  // what will sit at each final path; anything else already there must be ours to replace
  const baseRelDirs = new Set(base.dirs.values());
  const finalDirs = new Set(p.dirs.map((d) => d.g.rel));
  for (const d of p.dirs) {
    if (d.from === d.g.rel) continue;
    if (!baseRelDirs.has(d.g.rel) && !base.files.has(d.g.rel)) checkFree(host(d.g.rel), d.g.rel);
  }
  for (const f of p.files) {
    if (f.keep && f.keep.rel === f.rel) continue;
    if (!baseRelDirs.has(f.rel) && !base.files.has(f.rel)) checkFree(host(f.rel), f.rel);
  }
  void finalDirs;

  const movedDirs = new Map<string, string>(); // baseline rel -> current absolute path
  const locate = (rel: string): string => {
    const parts = rel.split('/');
    for (let k = parts.length; k > 0; k--) {
      const pre = parts.slice(0, k).join('/');
      const m = movedDirs.get(pre);
      if (m) return path.join(m, ...parts.slice(k));
    }
    return host(rel);
  };
  let seq = 0;
  const tmpName = (dir: string): string => path.join(dir, `${TMP_PREFIX}${process.pid}-${Date.now().toString(36)}-${seq++}`);
  const stays = new Set(p.dirs.filter((d) => d.from !== null && d.from === d.g.rel).map((d) => d.g.rel));

  const written: Array<{ f: GFile; tmp: string; hf: HostFile }> = [];
  let applying = false;
  try {
    // A0. directory clusters still read from host files that are about to change: pin them
    const dying = new Set<HostFile>(p.deletedFiles);
    for (const d of p.dirs) {
      for (const c of d.g.chain) {
        const src = sourceOf(node, c);
        if (!src || !dying.has(src.file)) continue;
        const buf = Buffer.alloc(node.cs);
        const off = node.clusterOffset(c);
        await node.readView(buf, off);
        for (let k = 0; k < node.geo.spc; k++) node.overlay.set(off / SECTOR + k, Buffer.from(buf.subarray(k * SECTOR, (k + 1) * SECTOR)));
      }
    }
    // A. new and modified contents into temp files (the host is still untouched)
    for (const f of p.files) {
      if (f.keep) continue;
      const parentRel = f.rel.includes('/') ? f.rel.slice(0, f.rel.lastIndexOf('/')) : '';
      const tmp = tmpName(stays.has(parentRel) ? host(parentRel) : node.root);
      const old = base.files.get(f.rel);
      const mode = modeFor(f.attr, old?.mode);
      await writeContent(node, f, tmp, mode);
      written.push({ f, tmp, hf: { rel: f.rel, size: f.size, mtimeMs: f.mtimeMs ?? Date.now(), mode: 0o100000 | mode, alive: true } });
    }
    applying = true;
    // B. delete files nobody keeps, unless a new version replaces them in place
    const writtenRels = new Set(written.map((w) => w.f.rel));
    const parentOf = (rel: string): string => (rel.includes('/') ? rel.slice(0, rel.lastIndexOf('/')) : '');
    for (const hf of p.deletedFiles) {
      hf.alive = false;
      if (writtenRels.has(hf.rel) && stays.has(parentOf(hf.rel))) continue; // replaced in place by rename
      await fs.promises.unlink(host(hf.rel)).catch((e: NodeJS.ErrnoException) => {
        if (e.code !== 'ENOENT') throw ioError(`vvfat: deleting '${hf.rel}'`, e);
      });
    }
    // C. move out everything that changes place, deepest first
    const moves: Array<{ kind: 'dir' | 'file'; from: string; to: string; hf?: HostFile; tmp?: string }> = [];
    for (const d of p.dirs) if (d.from !== null && d.from !== d.g.rel) moves.push({ kind: 'dir', from: d.from, to: d.g.rel });
    for (const f of p.files) if (f.keep && f.keep.rel !== f.rel) moves.push({ kind: 'file', from: f.keep.rel, to: f.rel, hf: f.keep });
    moves.sort((a, b) => depth(b.from) - depth(a.from));
    for (const m of moves) {
      m.tmp = tmpName(node.root);
      await rename(locate(m.from), m.tmp);
      if (m.kind === 'dir') movedDirs.set(m.from, m.tmp);
    }
    // D. remove deleted directories (deepest first); host-only leftovers keep one alive
    for (const rel of [...p.deletedDirs].sort((a, b) => depth(b) - depth(a))) {
      const at = locate(rel);
      await fs.promises.rmdir(at).catch((e: NodeJS.ErrnoException) => {
        if (e.code === 'ENOENT') return;
        if (e.code === 'ENOTEMPTY' || e.code === 'EEXIST') { debug('keeping non-empty directory %s', at); return; }
        throw ioError(`vvfat: removing directory '${rel}'`, e);
      });
    }
    // E. directories into place, shallowest first
    const dirMoves = new Map(moves.filter((m) => m.kind === 'dir').map((m) => [m.to, m]));
    for (const d of [...p.dirs].sort((a, b) => depth(a.g.rel) - depth(b.g.rel))) {
      if (d.g.rel === '' || (d.from !== null && d.from === d.g.rel)) continue;
      const m = dirMoves.get(d.g.rel);
      if (m) await rename(m.tmp!, host(d.g.rel));
      else await fs.promises.mkdir(host(d.g.rel)).catch((e) => { throw ioError(`vvfat: creating directory '${d.g.rel}'`, e); });
    }
    // F. files into place
    for (const m of moves) {
      if (m.kind !== 'file') continue;
      await rename(m.tmp!, host(m.to));
      m.hf!.rel = m.to;
    }
    for (const w of written) await rename(w.tmp, host(w.f.rel));
    // G. attributes and times of kept files
    for (const f of p.files) {
      if (!f.keep) continue;
      const hf = f.keep;
      const wantRo = (f.attr & ATTR_RO) !== 0;
      const isRo = (hf.mode & 0o222) === 0;
      if (wantRo !== isRo) {
        const mode = wantRo ? hf.mode & 0o7555 : (hf.mode | 0o200) & 0o7777;
        await fs.promises.chmod(host(f.rel), mode).catch((e) => { throw ioError(`vvfat: chmod '${f.rel}'`, e); });
        hf.mode = (hf.mode & ~0o7777) | mode;
      }
      if (f.mtimeMs !== null && dosKey(f.mtimeMs) !== dosKey(hf.mtimeMs)) {
        await fs.promises.utimes(host(f.rel), new Date(f.atimeMs ?? f.mtimeMs), new Date(f.mtimeMs)).catch(() => undefined);
        hf.mtimeMs = f.mtimeMs;
      }
    }
    // renames and new entries are durable only once their directories are synced
    const touched = new Set<string>();
    const parentAbs = (rel: string): string => path.dirname(host(rel));
    for (const w of written) touched.add(parentAbs(w.f.rel));
    for (const m of moves) { touched.add(parentAbs(m.to)); touched.add(parentAbs(m.from)); }
    for (const hf of p.deletedFiles) touched.add(parentAbs(hf.rel));
    for (const d of p.dirs) if (d.from !== d.g.rel && d.g.rel) touched.add(parentAbs(d.g.rel));
    if (moves.length) touched.add(node.root);
    for (const dir of touched) await syncDir(dir);
    // H. the node's new picture of the host
    const runs: DataRun[] = [];
    const newFiles = new Map<string, HostFile>();
    const byFile = new Map<GFile, HostFile>();
    for (const w of written) byFile.set(w.f, w.hf);
    for (const f of p.files) {
      const hf = f.keep ?? byFile.get(f)!;
      newFiles.set(f.rel, hf);
      for (let i = 0; i < f.chain.length;) {
        let j = i + 1;
        while (j < f.chain.length && f.chain[j] === f.chain[j - 1] + 1) j++;
        runs.push({ start: f.chain[i], len: j - i, file: hf, offset: i * node.cs });
        i = j;
      }
    }
    runs.sort((a, b) => a.start - b.start);
    node.dataRuns = runs;
    // the file clusters now live on the host: their overlay sectors are no longer needed
    for (const r of runs) {
      for (let c = r.start; c < r.start + r.len; c++) {
        const s0 = node.clusterOffset(c) / SECTOR;
        for (let s = s0; s < s0 + node.geo.spc; s++) node.overlay.delete(s);
      }
    }
    const newDirs = new Map<number, string>();
    for (const d of p.dirs) newDirs.set(d.g.rel === '' ? -1 : d.g.cluster, d.g.rel);
    node.baseline = { dirs: newDirs, files: newFiles };
    node.dropFds();
    debug('committed %d written, %d moved, %d deleted files in %d ms', written.length, moves.length, p.deletedFiles.length, Date.now() - t0);
  } catch (e) {
    node.dropFds();
    if (!applying) for (const w of written) await fs.promises.unlink(w.tmp).catch(() => undefined);
    throw e instanceof ImgError ? e : ioError('vvfat: writing back to the host directory', e);
  }
}

async function syncDir(dir: string): Promise<void> {
  let fh: fs.promises.FileHandle | null = null;
  try {
    fh = await fs.promises.open(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
    await fh.sync();
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw ioError(`vvfat: syncing directory '${dir}'`, e);
  } finally {
    await fh?.close().catch(() => undefined);
  }
}

function dosKey(ms: number): number {
  const d = dosTime(ms);
  return d.date * 65536 + d.time;
}

function checkFree(abs: string, rel: string): void {
  try {
    fs.lstatSync(abs);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw ioError(`vvfat: checking '${rel}'`, e);
  }
  throw bad(`'/${rel}' exists on the host as something the virtual disk does not show`);
}

async function rename(from: string, to: string): Promise<void> {
  try {
    await fs.promises.rename(from, to);
  } catch (e) {
    throw ioError(`vvfat: renaming '${path.basename(from)}' to '${path.basename(to)}'`, e);
  }
}

function modeFor(attr: number, oldMode: number | undefined): number {
  const umask = process.umask();
  let mode = oldMode !== undefined ? oldMode & 0o7777 : 0o666 & ~umask;
  if (attr & ATTR_RO) mode &= ~0o222;
  else if ((mode & 0o222) === 0) mode |= 0o200;
  return mode;
}

async function writeContent(node: VvfatNode, f: GFile, tmp: string, mode: number): Promise<void> {
  let fh: fs.promises.FileHandle;
  try {
    fh = await fs.promises.open(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW, 0o600);
  } catch (e) {
    throw ioError(`vvfat: creating a temporary file for '${f.rel}'`, e);
  }
  try {
    const cs = node.cs;
    let i = 0;
    let written = 0;
    while (i < f.chain.length) {
      let j = i + 1;
      while (j < f.chain.length && f.chain[j] === f.chain[j - 1] + 1 && (j - i) * cs < (1 << 20)) j++;
      const buf = Buffer.alloc((j - i) * cs);
      await node.readView(buf, node.clusterOffset(f.chain[i]));
      const n = Math.min(buf.length, f.size - written);
      await fh.write(buf, 0, n, written);
      written += n;
      i = j;
    }
    await fh.chmod(mode);
    if (f.mtimeMs !== null) await fh.utimes(new Date(f.atimeMs ?? f.mtimeMs), new Date(f.mtimeMs));
    await fh.sync();
  } catch (e) {
    await fh.close().catch(() => undefined);
    await fs.promises.unlink(tmp).catch(() => undefined);
    throw ioError(`vvfat: writing '${f.rel}'`, e);
  }
  await fh.close();
}
