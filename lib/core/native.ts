// Typed access to the N-API addon (native/imgmount.c). The addon is optional for
// everything except mounting: callers check `native` for null and degrade or say why.
import path from 'node:path';

/** One entry of the guest->host extent map that native threads serve without JavaScript. */
export const MAP_WRITABLE = 1; // overwrites in place are allowed (allocated, unshared, untransformed)
export const MAP_ZERO = 2;     // reads return zeros without touching any fd (fd/hostOffset ignored)
export const MAP_DIRECT = 4;   // fd is O_DIRECT: native uses aligned bounce buffers; unaligned requests go to JS
export const MAP_CRYPT = 8;    // host sectors are encrypted with the cipher registered as flags >> 8 (setCrypt)
export const MAP_NOTIFY = 16;  // the first native write into the entry calls onNotify (then the flag is cleared)
export const MAX_CRYPT = 64;

export interface FuseFileSpec {
  /** path inside the mount, e.g. 'disk.raw' or 'snapshots/base.raw'; parent dirs are implied */
  path: string;
  size: number;
  readOnly: boolean;
  /** st_blocks in 512-byte units */
  blocks: number;
}

export interface FuseMountOptions {
  mountpoint: string;
  fsname: string;
  subtype: string;
  allowOther: boolean;
  threads: number;
  maxWrite: number;
  uid: number;
  gid: number;
  files: FuseFileSpec[];
  /** called on the JS thread whenever the request queue became non-empty (coalesced) */
  onRequests: () => void;
  /** called once the kernel's FUSE_INIT has been answered */
  onInit: () => void;
  /** called once every server thread has stopped (unmounted, aborted, or stop()); err is an errno or 0 */
  onExit: (err: number) => void;
  /** called when a native write first lands in an extent mapped with MAP_NOTIFY (offset: the extent's start) */
  onNotify?: (file: number, offset: number) => void;
}

export type FuseOp = 'read' | 'write' | 'fsync' | 'lseek' | 'fallocate';

/** A request that the native side could not serve from the map. */
export interface FuseRequest {
  id: bigint | number;   // FUSE unique; pass back to reply()
  file: number;          // index into FuseMountOptions.files
  op: FuseOp;
  offset: number;
  length: number;        // read/write/fallocate length
  data?: Buffer;         // write payload
  whence?: number;       // lseek: 3 SEEK_DATA, 4 SEEK_HOLE
  mode?: number;         // fallocate mode bits
  datasync?: boolean;    // fsync
}

export interface FuseServer { readonly __brand: 'FuseServer' }

export interface NativeAddon {
  fuseMount(opts: FuseMountOptions): FuseServer;
  takeRequests(srv: FuseServer): FuseRequest[];
  /** errno 0 = success; payload: Buffer for read, number for write (bytes) and lseek (offset) */
  reply(srv: FuseServer, id: bigint | number, errno: number, payload?: Buffer | number): void;
  /** entries: flat array [guestOffset, length, fd, hostOffset, flags] * n, sorted, non-overlapping;
   *  replaces whatever the map held in the covered ranges */
  setMap(srv: FuseServer, file: number, entries: Float64Array): void;
  /** registers sector cipher `id` (0..MAX_CRYPT-1, once each) for MAP_CRYPT entries; returns 0 or
   *  an errno when the native side cannot run it (such ranges then stay with JavaScript) */
  setCrypt(srv: FuseServer, id: number, cipher: string, key: Uint8Array, sectorSize: number, ivBase: number, ivBits: number): number;
  /** drops map entries overlapping the range; returns after no native thread still uses them */
  invalidate(srv: FuseServer, file: number, offset: number, length: number): void;
  setFileAttr(srv: FuseServer, file: number, size: number, blocks: number): void;
  /** stops the server threads and closes /dev/fuse (does not unmount) */
  stop(srv: FuseServer): void;
  stats(srv: FuseServer): { nativeReads: number; nativeWrites: number; jsRequests: number };

  // system calls Node lacks; each returns 0 or a positive errno unless stated
  ofdSetLock(fd: number, start: number, len: number, type: 'r' | 'w' | 'u'): number;
  /** F_OFD_GETLK: null when the lock could be taken, else the conflicting lock's type */
  ofdGetLock(fd: number, start: number, len: number, type: 'r' | 'w'): null | { type: 'r' | 'w'; pid: number };
  fallocate(fd: number, mode: number, offset: number, len: number): number;
  /** lseek with SEEK_DATA (3) / SEEK_HOLE (4); returns the offset or -errno */
  lseek(fd: number, offset: number, whence: number): number;
  blkGetSize64(fd: number): number;
  /** umount2(2) */
  umount(path: string, flags: number): number;
  /** a Buffer whose memory is aligned to `align` bytes (for O_DIRECT) */
  allocAligned(size: number, align: number): Buffer;
  isAligned(buf: Uint8Array, align: number): boolean;
}

export const FALLOC_FL_KEEP_SIZE = 1;
export const FALLOC_FL_PUNCH_HOLE = 2;
export const FALLOC_FL_ZERO_RANGE = 0x10;
export const MNT_FORCE = 1;
export const MNT_DETACH = 2;

let loaded: NativeAddon | null | undefined;
let loadError = '';

export function loadNative(): NativeAddon | null {
  if (loaded !== undefined) return loaded;
  try {
    // eslint-disable-next-line @typescript-eslint/no-var-requires
    const build = require('node-gyp-build') as (dir: string) => NativeAddon;
    loaded = build(path.join(__dirname, '..', '..', '..'));
  } catch (e) {
    loadError = (e as Error).message.split('\n')[0];
    loaded = null;
  }
  return loaded;
}

export function nativeLoadError(): string { return loadError; }
