// The virtual FAT disk node: metadata synthesized at open, file contents read from the host
// on demand, guest writes (rw) kept in a sector overlay and committed to the host directory
// on flush and close (see commit.ts).
import fs from 'node:fs';
import path from 'node:path';
import { ImgError, ioError } from '../../core/errors';
import { Mutex } from '../../core/mutex';
import type { BlockNode, Extent, WriteFlags } from '../../core/node';
import { findRun, firstRunFrom, Geometry, HostFile, Layout, ScanDir } from './layout';
import type { Baseline } from './commit';
import { eocOf, makeBootSector, makeFsInfo, makeMbr, packFat } from './sectors';

const SECTOR = 512;
const FD_CACHE = 16;

/** A post-commit mapping of guest clusters to host files (sorted by start). */
export interface DataRun { start: number; len: number; file: HostFile; offset: number }

interface CachedFd { handle: fs.promises.FileHandle; refs: number; closing: boolean }

export class VvfatNode implements BlockNode {
  readonly driver = 'vvfat';
  readonly size: number;
  readonly readOnly: boolean;
  readonly align = SECTOR;
  readonly backing = null;
  readonly file = null;
  readonly filename: string;
  mapInvalidator = null;

  readonly geo: Geometry;
  readonly cs: number;
  private readonly mbr: Buffer | null;
  private readonly boot: Buffer;
  private readonly fsinfo: Buffer | null;
  /** guest-written sectors (rw), by absolute sector number */
  readonly overlay = new Map<number, Buffer>();
  /** the overlay changed since the last commit */
  dirty = false;
  /** after a commit: where guest files' clusters live on the host now */
  dataRuns: DataRun[] | null = null;
  readonly mutex = new Mutex();
  /** what the host directory holds (set at open, updated by each commit) */
  baseline!: Baseline;
  private fds = new Map<HostFile, CachedFd>();
  private closed = false;
  private committing: Promise<void> | null = null;

  constructor(readonly root: string, readonly layout: Layout, readOnly: boolean, readonly label: string) {
    this.geo = layout.geo;
    this.cs = this.geo.spc * SECTOR;
    this.size = this.geo.totalSectors * SECTOR;
    this.readOnly = readOnly;
    this.filename = `fat:${this.geo.floppy ? 'floppy:' : ''}${readOnly ? '' : 'rw:'}${this.geo.fatType}:${root}`;
    this.mbr = this.geo.floppy ? null : makeMbr(this.geo);
    this.boot = makeBootSector(this.geo, label, layout.root.cluster || 2);
    this.fsinfo = this.geo.fatType === 32
      ? makeFsInfo(this.geo.clusters - layout.usedClusters, layout.usedClusters + 2) : null;
  }

  /** absolute sector where the partition (boot sector) starts */
  get partStart(): number { return this.geo.partStart; }
  /** absolute byte offset of cluster c */
  clusterOffset(c: number): number {
    return (this.geo.partStart + this.geo.dataStart) * SECTOR + (c - 2) * this.cs;
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    // host files move while a commit runs: guest reads wait for it
    while (this.committing) await this.committing.catch(() => undefined);
    return this.readView(buf, offset);
  }

  /** base + overlay, without waiting for a commit (the commit itself reads through this) */
  async readView(buf: Uint8Array, offset: number): Promise<void> {
    await this.readBase(buf, offset);
    if (this.overlay.size) this.patchOverlay(buf, offset);
  }

  private patchOverlay(buf: Uint8Array, offset: number): void {
    const s0 = Math.floor(offset / SECTOR);
    const s1 = Math.ceil((offset + buf.length) / SECTOR);
    if (s1 - s0 > this.overlay.size * 4) {
      for (const [s, data] of this.overlay) if (s >= s0 && s < s1) this.copySector(buf, offset, s, data);
    } else {
      for (let s = s0; s < s1; s++) {
        const data = this.overlay.get(s);
        if (data) this.copySector(buf, offset, s, data);
      }
    }
  }

  private copySector(buf: Uint8Array, offset: number, s: number, data: Buffer): void {
    const from = Math.max(offset, s * SECTOR);
    const to = Math.min(offset + buf.length, (s + 1) * SECTOR);
    buf.set(data.subarray(from - s * SECTOR, to - s * SECTOR), from - offset);
  }

  /** the synthesized disk without the guest's writes */
  async readBase(buf: Uint8Array, offset: number): Promise<void> {
    const g = this.geo;
    const end = offset + buf.length;
    let pos = offset;
    while (pos < end) {
      const out = buf.subarray(pos - offset);
      const sector = Math.floor(pos / SECTOR);
      const inSector = pos - sector * SECTOR;
      if (sector < g.partStart) {
        const n = Math.min(end - pos, SECTOR - inSector);
        if (sector === 0 && this.mbr) out.set(this.mbr.subarray(inSector, inSector + n));
        else out.fill(0, 0, n);
        pos += n;
        continue;
      }
      const rel = sector - g.partStart;
      const relByte = pos - g.partStart * SECTOR;
      if (rel >= g.partSectors) { out.fill(0, 0, end - pos); break; }
      if (rel < g.reserved) {
        const n = Math.min(end - pos, SECTOR - inSector);
        const src = rel === 0 || (g.fatType === 32 && rel === 6) ? this.boot
          : g.fatType === 32 && (rel === 1 || rel === 7) ? this.fsinfo : null;
        if (src) out.set(src.subarray(inSector, inSector + n)); else out.fill(0, 0, n);
        pos += n;
        continue;
      }
      const fatStart = g.reserved * SECTOR;
      const fatBytes = g.spf * SECTOR;
      const rootStart = fatStart + 2 * fatBytes;
      const dataStart = g.dataStart * SECTOR;
      if (relByte < rootStart) {
        const inFat = (relByte - fatStart) % fatBytes;
        const n = Math.min(end - pos, fatBytes - inFat);
        out.set(this.fatBytes(inFat, n));
        pos += n;
        continue;
      }
      if (relByte < dataStart) {
        const inRoot = relByte - rootStart;
        const n = Math.min(end - pos, dataStart - relByte);
        this.copyDirBytes(this.layout.root, inRoot, out.subarray(0, n));
        pos += n;
        continue;
      }
      const d = relByte - dataStart;
      const c = 2 + Math.floor(d / this.cs);
      if (c >= g.clusters + 2) { out.fill(0, 0, end - pos); break; }
      const n = await this.readClusters(c, d % this.cs, out.subarray(0, Math.min(end - pos, (g.clusters + 2 - c) * this.cs - (d % this.cs))));
      pos += n;
    }
  }

  private copyDirBytes(dir: ScanDir, off: number, out: Uint8Array): void {
    const b = dir.bytes;
    const avail = b ? Math.max(0, Math.min(out.length, b.length - off)) : 0;
    if (avail > 0) out.set(b!.subarray(off, off + avail));
    out.fill(0, avail);
  }

  /** fills a prefix of out with the data starting at cluster c (+within); returns bytes filled */
  private async readClusters(c: number, within: number, out: Uint8Array): Promise<number> {
    const L = this.layout;
    if (this.dataRuns) {
      const dr = this.findDataRun(c);
      if (dr) {
        const n = Math.min(out.length, (dr.start + dr.len - c) * this.cs - within);
        await this.readHost(dr.file, dr.offset + (c - dr.start) * this.cs + within, out.subarray(0, n));
        return n;
      }
    }
    const i = findRun(L.runStart, L.runLen, c);
    if (i < 0) {
      // free: up to the next allocated run
      const j = firstRunFrom(L.runStart, L.runLen, c);
      let stop = j < L.runStart.length ? L.runStart[j] : this.geo.clusters + 2;
      if (this.dataRuns) stop = Math.min(stop, c + 1);
      const n = Math.min(out.length, (stop - c) * this.cs - within);
      out.fill(0, 0, n);
      return n;
    }
    const owner = L.owners[L.runOwner[i]];
    let n = Math.min(out.length, (L.runStart[i] + L.runLen[i] - c) * this.cs - within);
    const off = L.runOffset[i] + (c - L.runStart[i]) * this.cs + within;
    if ('dirs' in owner) {
      this.copyDirBytes(owner, off, out.subarray(0, n));
    } else if (owner.alive && !this.dataRuns) {
      await this.readHost(owner, off, out.subarray(0, n));
    } else {
      // after a commit: a cluster no guest file uses any more (or replaced on the host)
      n = Math.min(out.length, this.cs - within);
      if (owner.alive) await this.readHost(owner, off, out.subarray(0, n));
      else out.fill(0, 0, n);
    }
    return n;
  }

  findDataRun(c: number): DataRun | null {
    const r = this.dataRuns!;
    let lo = 0;
    let hi = r.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (r[mid].start > c) hi = mid - 1;
      else if (r[mid].start + r[mid].len <= c) lo = mid + 1;
      else return r[mid];
    }
    return null;
  }

  /** reads host file bytes; bytes past the file's end (it shrank) read as zeros */
  async readHost(file: HostFile, offset: number, out: Uint8Array): Promise<void> {
    const want = Math.max(0, Math.min(out.length, file.size - offset));
    let got = 0;
    if (want > 0) {
      const fdc = await this.acquire(file);
      try {
        while (got < want) {
          const { bytesRead } = await fdc.handle.read(out, got, want - got, offset + got);
          if (bytesRead === 0) break;
          got += bytesRead;
        }
      } catch (e) {
        throw ioError(`vvfat: reading '${file.rel}'`, e);
      } finally {
        this.release(file, fdc);
      }
    }
    out.fill(0, got);
  }

  private async acquire(file: HostFile): Promise<CachedFd> {
    const hit = this.fds.get(file);
    if (hit && !hit.closing) {
      this.fds.delete(file);
      this.fds.set(file, hit); // LRU order
      hit.refs++;
      return hit;
    }
    let handle: fs.promises.FileHandle;
    try {
      handle = await fs.promises.open(path.join(this.root, file.rel), fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
    } catch (e) {
      throw ioError(`vvfat: opening '${file.rel}'`, e);
    }
    const entry: CachedFd = { handle, refs: 1, closing: false };
    const raced = this.fds.get(file);
    if (raced) { this.retire(file, raced); }
    this.fds.set(file, entry);
    while (this.fds.size > FD_CACHE) {
      const [k, v] = this.fds.entries().next().value as [HostFile, CachedFd];
      this.retire(k, v);
    }
    return entry;
  }

  private retire(file: HostFile, e: CachedFd): void {
    if (this.fds.get(file) === e) this.fds.delete(file);
    e.closing = true;
    if (e.refs === 0) void e.handle.close().catch(() => undefined);
  }

  private release(file: HostFile, e: CachedFd): void {
    e.refs--;
    if (e.closing && e.refs === 0) void e.handle.close().catch(() => undefined);
  }

  /** forget cached descriptors (after host files were replaced or renamed) */
  dropFds(): void {
    for (const [k, v] of [...this.fds]) this.retire(k, v);
  }

  /** FAT bytes [off, off+len) of one FAT copy, generated from the original cluster runs */
  fatBytes(off: number, len: number): Buffer {
    const g = this.geo;
    let e0: number;
    let b0: number;
    let n: number;
    if (g.fatType === 12) {
      e0 = Math.floor(off / 3) * 2;
      b0 = (e0 * 3) / 2;
      n = Math.ceil(((off + len - b0) * 2) / 3) + 1;
    } else {
      const w = g.fatType / 8;
      e0 = Math.floor(off / w);
      b0 = e0 * w;
      n = Math.ceil((off + len - b0) / w);
    }
    const vals = new Uint32Array(n);
    const eoc = eocOf(g.fatType);
    const L = this.layout;
    let ri = firstRunFrom(L.runStart, L.runLen, Math.max(2, e0));
    for (let i = 0; i < n; i++) {
      const c = e0 + i;
      if (c === 0) { vals[i] = (eoc & ~0xff) | g.media; continue; }
      if (c === 1) { vals[i] = eoc; continue; }
      if (c >= g.clusters + 2) break;
      while (ri < L.runStart.length && L.runStart[ri] + L.runLen[ri] <= c) ri++;
      if (ri >= L.runStart.length || L.runStart[ri] > c) continue;
      vals[i] = c === L.runStart[ri] + L.runLen[ri] - 1 ? eoc : c + 1;
    }
    const packed = packFat(g.fatType, vals);
    return packed.subarray(off - b0, off - b0 + len);
  }

  async write(buf: Uint8Array, offset: number, _flags?: WriteFlags): Promise<void> {
    if (this.readOnly) throw new ImgError('readonly', 'vvfat: the virtual FAT disk is read-only (use fat:rw:)');
    await this.mutex.lock(async () => {
      // only sectors that differ from the synthesized disk are kept: an unchanged sector
      // written back (a guest rewriting a whole page) must not turn its file into a copy
      const base = Buffer.alloc(buf.length);
      await this.readBase(base, offset);
      for (let p = 0; p < buf.length; p += SECTOR) {
        const s = (offset + p) / SECTOR;
        const chunk = buf.subarray(p, p + SECTOR);
        const cur = this.overlay.get(s);
        if (Buffer.compare(chunk, base.subarray(p, p + SECTOR)) === 0) {
          if (cur) { this.overlay.delete(s); this.dirty = true; }
          continue;
        }
        if (cur) { if (!cur.equals(chunk)) { cur.set(chunk); this.dirty = true; } }
        else { this.overlay.set(s, Buffer.from(chunk)); this.dirty = true; }
      }
    });
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    const z = Buffer.alloc(Math.min(length, 1 << 20));
    for (let p = 0; p < length; p += z.length) {
      await this.write(z.subarray(0, Math.min(z.length, length - p)), offset + p);
    }
  }

  async flush(): Promise<void> {
    if (this.readOnly || this.closed) return;
    await this.mutex.lock(async () => {
      if (!this.dirty) return;
      const { commit } = await import('./commit');
      const p = commit(this);
      this.committing = p;
      try { await p; } finally { this.committing = null; }
    });
  }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    const g = this.geo;
    const dataStartByte = (g.partStart + g.dataStart) * SECTOR;
    const dataEndByte = (g.partStart + g.dataStart) * SECTOR + g.clusters * this.cs;
    if (offset < dataStartByte) {
      // MBR gap and metadata: data, but the gap after the MBR reads zeros
      if (g.partStart && offset >= SECTOR && offset < g.partStart * SECTOR && !this.overlayIn(offset, g.partStart * SECTOR - offset)) {
        return { offset, length: Math.min(length, g.partStart * SECTOR - offset), state: 'zero' };
      }
      return { offset, length: Math.min(length, dataStartByte - offset), state: 'data' };
    }
    if (offset >= dataEndByte) {
      const n = Math.min(length, this.size - offset);
      return { offset, length: n, state: this.overlayIn(offset, n) ? 'data' : 'zero' };
    }
    const c = 2 + Math.floor((offset - dataStartByte) / this.cs);
    const clusterEnd = this.clusterOffset(c + 1);
    const L = this.layout;
    const dr = this.dataRuns ? this.findDataRun(c) : null;
    if (dr) return { offset, length: Math.min(length, this.clusterOffset(dr.start + dr.len) - offset), state: 'data' };
    const ri = findRun(L.runStart, L.runLen, c);
    if (ri >= 0) {
      const runEnd = this.dataRuns ? c + 1 : L.runStart[ri] + L.runLen[ri];
      return { offset, length: Math.min(length, this.clusterOffset(runEnd) - offset), state: 'data' };
    }
    const j = firstRunFrom(L.runStart, L.runLen, c);
    const stopC = this.dataRuns ? c + 1 : j < L.runStart.length ? L.runStart[j] : g.clusters + 2;
    let n = Math.min(length, this.clusterOffset(stopC) - offset);
    if (this.overlay.size) {
      n = Math.min(n, Math.max(clusterEnd - offset, 0), 1 << 20);
      if (this.overlayIn(offset, n)) return { offset, length: n, state: 'data' };
    }
    return { offset, length: n, state: 'zero' };
  }

  private overlayIn(offset: number, length: number): boolean {
    if (!this.overlay.size) return false;
    const s0 = Math.floor(offset / SECTOR);
    const s1 = Math.ceil((offset + length) / SECTOR);
    if (s1 - s0 > this.overlay.size) {
      for (const s of this.overlay.keys()) if (s >= s0 && s < s1) return true;
      return false;
    }
    for (let s = s0; s < s1; s++) if (this.overlay.has(s)) return true;
    return false;
  }

  async infoExtra(): Promise<Record<string, unknown>> {
    return { 'cluster-size': this.cs };
  }

  async formatSpecific(): Promise<{ type: string; data: Record<string, unknown> } | null> {
    return null;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    let err: unknown = null;
    if (!this.readOnly) {
      try { await this.flush(); } catch (e) { err = e; }
    }
    this.closed = true;
    this.dropFds();
    this.overlay.clear();
    if (err) throw err;
  }
}
