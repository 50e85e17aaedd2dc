// Exposes block nodes as files of a FUSE mount. The native addon serves reads and overwrites
// that the extent map covers on its own threads; everything else arrives here in batches.
// Before a node changes how a guest range maps to host storage it calls mapInvalidator,
// which drops the map entries synchronously (waiting for native I/O in flight).
import os from 'node:os';
import createDebug from 'debug';
import { ImgError, toErrno } from '../core/errors';
import { chainStatus, discardAt, flushNode, readAt, writeAt, writeZeroesAt } from '../core/io';
import type { BlockNode, HostCrypt } from '../core/node';
import { FuseRequest, FuseServer, loadNative, MAP_CRYPT, MAP_DIRECT, MAP_NOTIFY, MAP_WRITABLE, MAP_ZERO, MAX_CRYPT, NativeAddon, nativeLoadError } from '../core/native';

// Request threads: 4, but no more than the CPUs (at least 2, so one can read the next request
// while another is in a syscall). Writers of one host file queue on its inode lock and spin
// there; on a 2-CPU VM whose fresh memory was slow to touch, 2 threads beat 4 in 6 of 6
// allocating-write runs (e.g. 1202 vs 803 MiB/s) and matched them otherwise.
const DEFAULT_THREADS = Math.min(4, Math.max(2, os.availableParallelism()));

const debug = createDebug('imgmount:fuse');
const E = os.constants.errno;

export interface ExportFile {
  path: string;
  node: BlockNode;
  readOnly: boolean;
}

export interface ExportOptions {
  mountpoint: string;
  allowOther: boolean;
  fsname: string;
  threads?: number;
  /** cap on extents installed up front; the rest is learnt on misses */
  initialMapExtents?: number;
}

const FALLOC_FL_KEEP_SIZE = 1;
const FALLOC_FL_PUNCH_HOLE = 2;
const FALLOC_FL_ZERO_RANGE = 0x10;
const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const MAX_WRITE = 1 << 20;
const LEARN_SPAN = 64 << 20;

interface FileState {
  f: ExportFile;
  generation: number;
  dirtyBlocks: boolean;
  /** LEARN_SPAN-sized spans already mapped since the last invalidation */
  learnt: Set<number>;
  /** the last invalidations (generation, offset, end), so a map computed meanwhile for another
   *  range can still be installed */
  recent: { gen: number; off: number; end: number }[];
}

const RECENT_INVALIDATIONS = 64;
/** what a write served in JavaScript maps around itself (aligned) */
const WRITE_MAP_SPAN = 1 << 20;

export class FuseExport {
  private nat: NativeAddon;
  private srv: FuseServer | null = null;
  private files: FileState[];
  private exited: Promise<number>;
  private resolveExit!: (err: number) => void;
  private blocksTimer: NodeJS.Timeout | null = null;
  private pending = 0;
  private idle: (() => void) | null = null;
  private paused: FuseRequest[] | null = null;
  /** ciphers registered with the native side (null: it cannot run that one) */
  private crypts = new Map<HostCrypt, number | null>();

  constructor(files: ExportFile[], private o: ExportOptions) {
    const nat = loadNative();
    if (!nat) throw new ImgError('io', `mount needs the native addon, which did not load (${nativeLoadError()}); run npm install`);
    this.nat = nat;
    this.files = files.map((f) => ({ f, generation: 0, dirtyBlocks: false, learnt: new Set<number>(), recent: [] }));
    this.exited = new Promise((r) => { this.resolveExit = r; });
  }

  /** Mounts and resolves once the kernel's INIT has been answered. */
  async start(): Promise<void> {
    const specs = await Promise.all(this.files.map(async (s) => ({
      path: s.f.path,
      size: s.f.node.size,
      readOnly: s.f.readOnly,
      blocks: await blocksOf(s.f.node),
    })));
    let initDone!: () => void;
    const init = new Promise<void>((r) => { initDone = r; });
    try {
      this.srv = this.nat.fuseMount({
        mountpoint: this.o.mountpoint,
        fsname: this.o.fsname,
        subtype: 'imgmount',
        allowOther: this.o.allowOther,
        threads: this.o.threads ?? DEFAULT_THREADS,
        maxWrite: MAX_WRITE,
        uid: process.getuid ? process.getuid() : 0,
        gid: process.getgid ? process.getgid() : 0,
        files: specs,
        onRequests: () => this.drain(),
        onInit: () => initDone(),
        onExit: (err) => this.resolveExit(err),
        onNotify: (file, offset) => this.files[file]?.f.node.onMappedWrite?.(offset),
      });
    } catch (e) {
      const msg = (e as Error).message;
      throw new ImgError(/fusermount3 not found/.test(msg) ? 'usage' : 'io', `mount on ${this.o.mountpoint}: ${msg}`);
    }
    this.files.forEach((s, i) => {
      s.f.node.mapInvalidator = (off, len) => this.invalidate(i, off, len);
      s.f.node.mapHint = (off, len, host) => {
        const end = Math.min(s.f.node.size, off + len);
        const cryptId = host.crypt ? this.cryptId(host.crypt) : undefined;
        if (!this.srv || end <= off || cryptId === null) return;
        let flags = (host.direct ? MAP_DIRECT : 0) | (cryptId === undefined ? 0 : MAP_CRYPT | (cryptId << 8));
        if (host.writable && !s.f.readOnly && !s.f.node.readOnly) flags |= MAP_WRITABLE;
        if (host.notify) flags |= MAP_NOTIFY;
        this.nat.setMap(this.srv, i, Float64Array.from([off, end - off, host.fd, host.offset, flags]));
      };
    });
    await init;
    let lastNativeWrites = 0;
    this.blocksTimer = setInterval(() => {
      const st = this.stats();
      if (st && st.nativeWrites !== lastNativeWrites) {
        lastNativeWrites = st.nativeWrites;
        for (const f of this.files) f.dirtyBlocks = true;
      }
      this.refreshBlocks();
    }, 2000);
    this.blocksTimer.unref();
    // the initial map is built after INIT so the mount is usable at once; misses are served
    // by JavaScript meanwhile
    void this.buildInitialMaps().catch((e) => debug('initial map: %s', (e as Error).message));
  }

  /** Resolves when every server thread stopped (unmounted from outside or stop()). */
  wait(): Promise<number> { return this.exited; }

  /** Waits for requests in flight in JavaScript to finish. */
  async quiesce(): Promise<void> {
    while (this.pending > 0) await new Promise<void>((r) => { this.idle = r; });
  }

  async stop(): Promise<void> {
    if (this.blocksTimer) clearInterval(this.blocksTimer);
    // (npm run bench reads this line from the server log, to tell a run whose requests fell
    // back to JavaScript from a slow machine)
    const st = this.stats();
    if (st) debug('requests served natively: %d reads, %d writes; in JavaScript: %d', st.nativeReads, st.nativeWrites, st.jsRequests);
    if (this.srv) this.nat.stop(this.srv);
    for (const s of this.files) { s.f.node.mapInvalidator = null; s.f.node.mapHint = null; }
    await this.quiesce();
  }

  /**
   * Runs fn with all I/O stopped: requests wait, the native map is emptied (so no native
   * thread touches the image), and the map is rebuilt on demand afterwards.
   */
  async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    while (this.paused) await new Promise((r) => setTimeout(r, 10));
    this.paused = [];
    try {
      await this.quiesce();
      for (let i = 0; i < this.files.length; i++) this.invalidate(i, 0, Math.max(1, this.files[i].f.node.size));
      return await fn();
    } finally {
      const backlog = this.paused ?? [];
      this.paused = null;
      for (const f of this.files) f.dirtyBlocks = true;
      this.dispatch(backlog);
      this.refreshBlocks();
    }
  }

  stats(): { nativeReads: number; nativeWrites: number; jsRequests: number } | null {
    return this.srv ? this.nat.stats(this.srv) : null;
  }

  private invalidate(file: number, offset: number, length: number): void {
    const s = this.files[file];
    s.generation++;
    s.recent.push({ gen: s.generation, off: offset, end: offset + Math.max(1, length) });
    if (s.recent.length > RECENT_INVALIDATIONS) s.recent.shift();
    // only the spans the change touches need learning again
    for (let sp = Math.floor(offset / LEARN_SPAN); sp * LEARN_SPAN < offset + Math.max(1, length); sp++) s.learnt.delete(sp);
    if (this.srv) this.nat.invalidate(this.srv, file, offset, length);
  }

  private drain(): void {
    if (!this.srv) return;
    const reqs = this.nat.takeRequests(this.srv);
    if (this.paused) { this.paused.push(...reqs); return; }
    this.dispatch(reqs);
  }

  private dispatch(reqs: FuseRequest[]): void {
    for (const r of reqs) {
      this.pending++;
      this.handle(r).catch((e) => debug('request failed: %s', (e as Error).message)).finally(() => {
        this.pending--;
        if (this.pending === 0 && this.idle) { const i = this.idle; this.idle = null; i(); }
      });
    }
  }

  private reply(id: number | bigint, errno: number, payload?: Buffer | number): void {
    if (this.srv) this.nat.reply(this.srv, id, errno, payload);
  }

  private async handle(r: FuseRequest): Promise<void> {
    const s = this.files[r.file];
    if (!s) { this.reply(r.id, E.ENOENT); return; }
    const node = s.f.node;
    try {
      switch (r.op) {
        case 'read': {
          const len = Math.max(0, Math.min(r.length, node.size - r.offset));
          const buf = Buffer.allocUnsafe(len);
          if (len) await readAt(node, buf, r.offset);
          this.reply(r.id, 0, buf);
          if (len) this.learn(r.file, r.offset, len).catch((e) => debug('learn: %s', (e as Error).message));
          return;
        }
        case 'write': {
          if (s.f.readOnly) { this.reply(r.id, E.EROFS); return; }
          const data = r.data ?? Buffer.alloc(0);
          const len = Math.max(0, Math.min(data.length, node.size - r.offset));
          if (len === 0 && data.length) { this.reply(r.id, E.ENOSPC); return; }
          await writeAt(node, data.subarray(0, len), r.offset);
          this.reply(r.id, 0, len);
          s.dirtyBlocks = true;
          this.scheduleBlocks();
          // map the aligned neighbourhood of what was written, so overwrites of it (and of the
          // rest of a cluster it allocated: random 4 KiB writes into an empty qcow2 went to
          // JavaScript 98 times in 100 when only the 4 KiB written was mapped) go native
          if (len) {
            const start = Math.floor(r.offset / WRITE_MAP_SPAN) * WRITE_MAP_SPAN;
            const end = Math.min(node.size, Math.ceil((r.offset + len) / WRITE_MAP_SPAN) * WRITE_MAP_SPAN);
            this.mapRange(r.file, start, end, 64).catch((e) => debug('learn: %s', (e as Error).message));
          }
          return;
        }
        case 'fsync':
          if (!s.f.readOnly) await flushNode(node);
          this.reply(r.id, 0);
          this.refreshBlocks();
          return;
        case 'lseek':
          this.reply(r.id, 0, await this.seek(node, r.offset, r.whence ?? 0));
          return;
        case 'fallocate':
          await this.fallocate(s, r.mode ?? 0, r.offset, r.length);
          this.reply(r.id, 0);
          return;
        default:
          this.reply(r.id, E.ENOSYS);
      }
    } catch (e) {
      const errno = toErrno(e);
      debug('%s %d+%d failed: %s (errno %d)', r.op, r.offset, r.length, (e as Error).message, errno);
      this.reply(r.id, errno);
    }
  }

  private async fallocate(s: FileState, mode: number, offset: number, length: number): Promise<void> {
    const node = s.f.node;
    if (s.f.readOnly) throw new ImgError('readonly', 'fallocate on a read-only file');
    const end = offset + length;
    if (mode & FALLOC_FL_PUNCH_HOLE) {
      if (!(mode & FALLOC_FL_KEEP_SIZE)) throw new ImgError('usage', 'PUNCH_HOLE needs KEEP_SIZE');
      const e = Math.min(end, node.size);
      if (e > offset) await writeZeroesAt(node, offset, e - offset, { mayUnmap: true });
    } else if (mode & FALLOC_FL_ZERO_RANGE) {
      if (end > node.size) throw new ImgError('nospace', 'the disk cannot grow');
      await writeZeroesAt(node, offset, length);
    } else if ((mode & ~FALLOC_FL_KEEP_SIZE) === 0) {
      // plain allocation: the disk has a fixed size; inside it, space is provided on write
      if (end > node.size && !(mode & FALLOC_FL_KEEP_SIZE)) throw new ImgError('nospace', 'the disk cannot grow');
    } else {
      throw new ImgError('unsupported', `fallocate mode ${mode} is not supported`);
    }
    s.dirtyBlocks = true;
    this.scheduleBlocks();
    void discardAt; // discard is reached through PUNCH_HOLE as zeroing with unmap
  }

  /** SEEK_DATA / SEEK_HOLE from block status through the backing chain. */
  private async seek(node: BlockNode, offset: number, whence: number): Promise<number> {
    if (whence !== SEEK_DATA && whence !== SEEK_HOLE) throw new ImgError('usage', 'bad whence');
    if (offset >= node.size) throw Object.assign(new Error('ENXIO'), { code: 'ENXIO' });
    let o = offset;
    while (o < node.size) {
      const ext = await chainStatus(node, o, node.size - o);
      // a zero region is a hole; data that reads as zeros is data
      const isData = ext.data;
      if (whence === SEEK_DATA && isData) return o;
      if (whence === SEEK_HOLE && !isData) return o;
      o += Math.max(1, ext.length);
    }
    if (whence === SEEK_HOLE) return node.size;
    throw Object.assign(new Error('ENXIO'), { code: 'ENXIO' });
  }

  /** Installs map entries for the range around a JS-served request, unless it changed meanwhile. */
  private async learn(file: number, offset: number, length: number): Promise<void> {
    const s = this.files[file];
    const span = Math.floor(offset / LEARN_SPAN);
    if (s.learnt.has(span)) return;
    s.learnt.add(span);
    const start = span * LEARN_SPAN;
    const end = Math.min(s.f.node.size, start + LEARN_SPAN);
    await this.mapRange(file, start, end, 16384);
  }

  private async mapRange(file: number, start: number, end: number, maxExtents: number): Promise<number> {
    const s = this.files[file];
    const node = s.f.node;
    const gen = s.generation;
    const entries: number[] = [];
    let o = start;
    let n = 0;
    while (o < end && n < maxExtents) {
      const ext = await chainStatus(node, o, end - o);
      if (ext.length <= 0) break;
      let flags = -1;
      let fd = -1;
      let hostOff = 0;
      const cryptId = ext.host?.crypt ? this.cryptId(ext.host.crypt) : undefined;
      if (ext.host && cryptId !== null) {
        flags = cryptId === undefined ? 0 : MAP_CRYPT | (cryptId << 8);
        fd = ext.host.fd;
        hostOff = ext.host.offset;
        if (ext.host.writable && ext.depth === 0 && !s.f.readOnly && !node.readOnly) flags |= MAP_WRITABLE;
        if (ext.host.direct) flags |= MAP_DIRECT;
      } else if (!ext.data && ext.zero) {
        flags = MAP_ZERO;
      }
      if (flags >= 0) {
        // extend the previous entry when it continues seamlessly
        const k = entries.length - 5;
        if (k >= 0 && entries[k] + entries[k + 1] === o && entries[k + 2] === fd && entries[k + 4] === flags &&
          (flags & MAP_ZERO || entries[k + 3] + entries[k + 1] === hostOff)) {
          entries[k + 1] += ext.length;
        } else {
          entries.push(o, ext.length, fd, hostOff, flags);
          n++;
        }
      }
      o += ext.length;
    }
    if (!this.srv || entries.length === 0 || this.changedSince(s, gen, start, o)) return o;
    this.nat.setMap(this.srv, file, Float64Array.from(entries));
    return o;
  }

  /** whether [start, end) may have been invalidated after generation gen */
  private changedSince(s: FileState, gen: number, start: number, end: number): boolean {
    if (s.generation === gen) return false;
    if (!s.recent.length || s.recent[0].gen > gen + 1) return true; // the log does not reach back
    return s.recent.some((r) => r.gen > gen && r.off < end && r.end > start);
  }

  /** the native id of a sector cipher, registering it on first use; null: JS must serve it */
  private cryptId(c: HostCrypt): number | null {
    let id = this.crypts.get(c);
    if (id !== undefined) return id;
    id = null;
    if (this.srv && this.crypts.size < MAX_CRYPT) {
      const err = this.nat.setCrypt(this.srv, this.crypts.size, c.cipher, c.key, c.sectorSize, c.ivBase, c.ivBits);
      if (err === 0) id = this.crypts.size;
      else debug('cipher %s stays in JavaScript (errno %d)', c.cipher, err);
    }
    this.crypts.set(c, id);
    return id;
  }

  private async buildInitialMaps(): Promise<void> {
    const budget = this.o.initialMapExtents ?? 200000;
    for (let i = 0; i < this.files.length; i++) {
      const size = this.files[i].f.node.size;
      let o = 0;
      let used = 0;
      while (o < size && used < budget && this.srv) {
        const end = Math.min(size, o + (1 << 30));
        o = await this.mapRange(i, o, end, 16384);
        used += 16384;
      }
    }
  }

  private scheduleBlocks(): void {
    // the periodic timer picks dirty files up
  }

  private refreshBlocks(): void {
    for (let i = 0; i < this.files.length; i++) {
      const s = this.files[i];
      if (!s.dirtyBlocks || !this.srv) continue;
      s.dirtyBlocks = false;
      void blocksOf(s.f.node).then((b) => { if (this.srv) this.nat.setFileAttr(this.srv, i, s.f.node.size, b); });
    }
  }
}

async function blocksOf(node: BlockNode): Promise<number> {
  try {
    const bytes = node.allocatedSize ? await node.allocatedSize() : node.size;
    return Math.ceil(bytes / 512);
  } catch {
    return 0;
  }
}
