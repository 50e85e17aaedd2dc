// The `file` and `host_device` protocols: a regular file or a host block device.
import fs from 'node:fs';
import path from 'node:path';
import { ImgError, ioError } from '../../core/errors';
import type { BlockNode, Extent, Preallocation, ZeroFlags } from '../../core/node';
import { loadNative, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE } from '../../core/native';
import { acquireLocks, LockMode } from '../../core/lock';

export interface FileOpenOptions {
  filename: string;
  readOnly: boolean;
  /** cache.direct: O_DIRECT */
  direct: boolean;
  /** cache.no-flush: flushes are ignored (cache=unsafe) */
  noFlush: boolean;
  /** writethrough: every write is durable before it completes (O_DSYNC) */
  writethrough: boolean;
  locking: LockMode;
  shareRw: boolean;
  /** permissions for locking; 'backing' shares writes only when the parent does */
  role?: 'image' | 'backing';
}

function readP(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.read(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}
function writeP(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.write(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

const DIRECT_ALIGN = 4096;

export class FileNode implements BlockNode {
  readonly driver: string;
  readonly readOnly: boolean;
  readonly align: number;
  readonly filename: string;
  readonly fd: number;
  readonly direct: boolean;
  readonly isBlockDevice: boolean;
  private _size: number;
  private noFlush: boolean;
  private closed = false;
  private releaseLocks: (() => void) | null = null;
  mapInvalidator = null;

  private constructor(o: FileOpenOptions, fd: number, size: number, blockDev: boolean, releaseLocks: (() => void) | null) {
    this.filename = o.filename;
    this.readOnly = o.readOnly;
    this.direct = o.direct;
    this.align = o.direct ? DIRECT_ALIGN : 1;
    this.fd = fd;
    this._size = size;
    this.isBlockDevice = blockDev;
    this.driver = blockDev ? 'host_device' : 'file';
    this.noFlush = o.noFlush;
    this.releaseLocks = releaseLocks;
  }

  static open(o: FileOpenOptions): FileNode {
    const C = fs.constants;
    let flags = (o.readOnly ? C.O_RDONLY : C.O_RDWR);
    if (o.direct) flags |= C.O_DIRECT;
    if (o.writethrough && !o.readOnly) flags |= C.O_DSYNC;
    let fd: number;
    try {
      fd = fs.openSync(o.filename, flags);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EINVAL' && o.direct) throw new ImgError('io', `Could not open '${o.filename}': the file system does not support O_DIRECT (cache=none)`);
      throw ioError(`Could not open '${o.filename}'`, e);
    }
    try {
      const st = fs.fstatSync(fd);
      if (st.isDirectory()) throw new ImgError('usage', `Could not open '${o.filename}': Is a directory`);
      let size = st.size;
      const blockDev = st.isBlockDevice();
      if (blockDev) size = blockDeviceSize(fd, st);
      const release = acquireLocks(fd, o.filename, o.locking, o.readOnly, o.shareRw, o.role ?? 'image');
      return new FileNode(o, fd, size, blockDev, release);
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  get size(): number { return this._size; }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    if (this.direct && !aligned(buf, offset)) return this.bounced(buf, offset, false);
    let done = 0;
    while (done < buf.length) {
      let n: number;
      try {
        n = await readP(this.fd, buf, done, buf.length - done, offset + done);
      } catch (e) {
        throw ioError(`read of '${this.filename}' failed`, e);
      }
      if (n === 0) { buf.fill(0, done); return; } // past EOF reads zeros
      done += n;
    }
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    if (this.readOnly) throw new ImgError('readonly', `write to '${this.filename}': opened read-only`);
    if (this.direct && !aligned(buf, offset)) return this.bounced(buf, offset, true);
    let done = 0;
    while (done < buf.length) {
      try {
        done += await writeP(this.fd, buf, done, buf.length - done, offset + done);
      } catch (e) {
        throw ioError(`write to '${this.filename}' failed`, e);
      }
    }
    if (offset + buf.length > this._size && !this.isBlockDevice) this._size = offset + buf.length;
  }

  // O_DIRECT needs aligned memory, offsets and lengths; Node buffers are not aligned, so copy
  // through an aligned buffer covering the request (read-modify-write for unaligned writes).
  private async bounced(buf: Uint8Array, offset: number, isWrite: boolean): Promise<void> {
    const nat = loadNative();
    if (!nat) throw new ImgError('io', `cache=none on '${this.filename}' needs the native addon`);
    const start = offset - (offset % DIRECT_ALIGN);
    const end = Math.ceil((offset + buf.length) / DIRECT_ALIGN) * DIRECT_ALIGN;
    const b = nat.allocAligned(end - start, DIRECT_ALIGN);
    const unaligned = start !== offset || end !== offset + buf.length;
    if (!isWrite || unaligned) await this.read(b, start);
    if (isWrite) {
      b.set(buf, offset - start);
      // never extend the file past what the caller wrote because of the alignment padding
      const limit = Math.max(this._size, offset + buf.length);
      if (end > limit) {
        await this.write(b.subarray(0, end - start), start);
        fs.ftruncateSync(this.fd, limit);
        this._size = limit;
      } else {
        await this.write(b, start);
      }
    } else {
      buf.set(b.subarray(offset - start, offset - start + buf.length));
    }
  }

  async writeZeroes(offset: number, length: number, flags?: ZeroFlags): Promise<void> {
    if (this.readOnly) throw new ImgError('readonly', `write to '${this.filename}': opened read-only`);
    const nat = loadNative();
    if (nat && !this.isBlockDevice && offset + length <= this._size) {
      const mode = flags?.mayUnmap ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
      if (nat.fallocate(this.fd, mode, offset, length) === 0) return;
    }
    if (flags?.noFallback) throw new ImgError('unsupported', 'efficient zeroing is not supported here');
    const chunk = Math.min(length, 1 << 20);
    const z = this.direct && nat ? nat.allocAligned(chunk, DIRECT_ALIGN).fill(0) : Buffer.alloc(chunk);
    for (let p = 0; p < length; p += chunk) {
      const n = Math.min(chunk, length - p);
      await this.write(z.subarray(0, n), offset + p);
    }
  }

  async discard(offset: number, length: number): Promise<void> {
    if (this.readOnly) throw new ImgError('readonly', `discard on '${this.filename}': opened read-only`);
    const nat = loadNative();
    if (!nat || this.isBlockDevice) return; // advisory
    const end = Math.min(offset + length, this._size);
    if (end > offset) nat.fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, end - offset);
  }

  async flush(): Promise<void> {
    if (this.noFlush || this.readOnly) return;
    await new Promise<void>((resolve, reject) => fs.fdatasync(this.fd, (e) => (e ? reject(ioError(`flush of '${this.filename}' failed`, e)) : resolve())));
  }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    const host = { fd: this.fd, offset, writable: !this.readOnly, direct: this.direct };
    const nat = loadNative();
    if (!nat || this.isBlockDevice || offset >= this._size) {
      return { offset, length, state: offset >= this._size ? 'zero' : 'data', host };
    }
    const SEEK_DATA = 3, SEEK_HOLE = 4;
    const data = nat.lseek(this.fd, offset, SEEK_DATA);
    if (data < 0) {
      // ENXIO: only a hole remains up to EOF
      return { offset, length: Math.min(length, this._size - offset), state: 'zero', host };
    }
    if (data > offset) return { offset, length: Math.min(length, data - offset), state: 'zero', host };
    const hole = nat.lseek(this.fd, offset, SEEK_HOLE);
    const end = hole < 0 ? this._size : hole;
    return { offset, length: Math.max(1, Math.min(length, end - offset)), state: 'data', host };
  }

  async truncate(size: number, prealloc: Preallocation = 'off'): Promise<void> {
    if (this.readOnly) throw new ImgError('readonly', `resize of '${this.filename}': opened read-only`);
    if (this.isBlockDevice) {
      if (size > this._size) throw new ImgError('nospace', `'${this.filename}' is a block device of ${this._size} bytes`);
      return;
    }
    const old = this._size;
    try {
      fs.ftruncateSync(this.fd, size);
    } catch (e) {
      throw ioError(`resize of '${this.filename}' failed`, e);
    }
    this._size = size;
    if (size > old) await preallocate(this, old, size - old, prealloc);
  }

  async allocatedSize(): Promise<number> {
    const st = fs.fstatSync(this.fd);
    return st.isBlockDevice() ? this._size : st.blocks * 512;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.releaseLocks?.();
    fs.closeSync(this.fd);
  }
}

function aligned(buf: Uint8Array, offset: number): boolean {
  const nat = loadNative();
  return offset % DIRECT_ALIGN === 0 && buf.length % DIRECT_ALIGN === 0 && !!nat && nat.isAligned(buf, DIRECT_ALIGN);
}

/** Fills [offset, offset+length) per qemu's preallocation modes for a protocol node. */
export async function preallocate(node: FileNode, offset: number, length: number, mode: Preallocation): Promise<void> {
  if (mode === 'off' || mode === 'metadata' || length <= 0) return;
  if (mode === 'falloc') {
    const nat = loadNative();
    if (!nat) throw new ImgError('unsupported', 'preallocation=falloc needs the native addon');
    const err = nat.fallocate(node.fd, 0, offset, length);
    if (err) throw new ImgError(err === 95 ? 'unsupported' : 'io', `preallocation=falloc on '${node.filename}' failed: errno ${err}`);
    return;
  }
  // full: write real zeros so every block is allocated
  const chunk = 1 << 20;
  const z = Buffer.alloc(Math.min(chunk, length));
  for (let p = 0; p < length; p += chunk) await node.write(z.subarray(0, Math.min(chunk, length - p)), offset + p);
}

function blockDeviceSize(fd: number, st: fs.Stats): number {
  const nat = loadNative();
  if (nat) return nat.blkGetSize64(fd);
  // without the addon: sysfs knows the size in 512-byte sectors
  const major = Math.floor(st.rdev / 256) & 0xfff;
  const minor = (st.rdev & 0xff) | ((st.rdev >> 12) & 0xfff00);
  const sectors = fs.readFileSync(path.join('/sys/dev/block', `${major}:${minor}`, 'size'), 'utf8');
  return Number(sectors.trim()) * 512;
}

/** Creates an empty protocol-level file (qemu's file driver create), truncating an existing one. */
export async function createFile(filename: string, size: number, prealloc: Preallocation, nocow = false): Promise<void> {
  let fd: number;
  try {
    fd = fs.openSync(filename, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o644);
  } catch (e) {
    throw ioError(`Could not create '${filename}'`, e);
  }
  try {
    const st = fs.fstatSync(fd);
    if (st.isBlockDevice()) return; // a device is used as it is
    fs.ftruncateSync(fd, 0);
    void nocow; // chattr +C is a btrfs-only hint; not applicable to other file systems
  } finally {
    fs.closeSync(fd);
  }
  await withFileRw(filename, (node) => node.truncate(size, prealloc));
}

/** Opens `filename` read-write, as image creation does, runs fn, then flushes and closes it. */
export async function withFileRw<T>(filename: string, fn: (f: FileNode) => Promise<T>): Promise<T> {
  const node = FileNode.open({ filename, readOnly: false, direct: false, noFlush: false, writethrough: false, locking: 'auto', shareRw: false });
  try {
    const r = await fn(node);
    await node.flush();
    return r;
  } finally {
    await node.close();
  }
}
