// Image locking compatible with qemu (block/file-posix.c): open-file-description byte-range
// locks. Byte 100+bit is held (shared) for each permission we use, byte 200+bit for each
// permission we refuse to share. A conflicting qemu-img/qemu-io/qemu-storage-daemon and
// imgmount therefore see each other.
import createDebug from 'debug';
import { ImgError } from './errors';
import { loadNative, nativeLoadError } from './native';

const debug = createDebug('imgmount:lock');

export type LockMode = 'on' | 'off' | 'auto';

const PERM_BASE = 100;
const SHARED_BASE = 200;
export const PERM_CONSISTENT_READ = 0x01;
export const PERM_WRITE = 0x02;
export const PERM_WRITE_UNCHANGED = 0x04;
export const PERM_RESIZE = 0x08;
const PERM_ALL = 0x0f;
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'];

/** The permissions an opener uses and shares, as qemu's defaults for a format on a file. */
export function permsFor(readOnly: boolean, shareRw: boolean, role: 'image' | 'backing'): { perm: number; shared: number } {
  if (role === 'backing') {
    return { perm: PERM_CONSISTENT_READ, shared: shareRw ? PERM_ALL : PERM_ALL & ~(PERM_WRITE | PERM_RESIZE) };
  }
  if (readOnly) {
    return { perm: PERM_CONSISTENT_READ, shared: shareRw ? PERM_ALL : PERM_ALL & ~(PERM_WRITE | PERM_RESIZE) };
  }
  return {
    perm: PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
    shared: shareRw ? PERM_ALL : PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
  };
}

/** Takes the lock bytes on fd and checks for conflicts; returns a release function. */
export function acquireLocks(fd: number, filename: string, mode: LockMode, readOnly: boolean, shareRw: boolean,
  role: 'image' | 'backing'): (() => void) | null {
  if (mode === 'off') return null;
  const nat = loadNative();
  if (!nat) {
    if (mode === 'on') throw new ImgError('io', `locking=on for '${filename}' needs the native addon (${nativeLoadError()})`);
    debug('no native addon: locking skipped for %s', filename);
    return null;
  }
  const { perm, shared } = permsFor(readOnly, shareRw, role);
  const held: number[] = [];
  const release = (): void => {
    for (const b of held) nat.ofdSetLock(fd, b, 1, 'u');
  };
  const take = (byte: number): boolean => {
    const err = nat.ofdSetLock(fd, byte, 1, 'r');
    if (err === 0) { held.push(byte); return true; }
    if (err === 22 /* EINVAL: no OFD locks here */ || err === 95 || err === 38) return false;
    release();
    throw new ImgError('locked', `Failed to lock byte ${byte} of '${filename}': another process is using the image`);
  };
  for (let bit = 0; bit < 4; bit++) {
    if (perm & (1 << bit)) {
      if (!take(PERM_BASE + bit)) return autoOff(mode, filename);
    }
    if (!(shared & (1 << bit))) {
      if (!take(SHARED_BASE + bit)) return autoOff(mode, filename);
    }
  }
  // a writer lock test on the opposite byte finds anyone who holds it
  for (let bit = 0; bit < 4; bit++) {
    if (perm & (1 << bit)) {
      const c = nat.ofdGetLock(fd, SHARED_BASE + bit, 1, 'w');
      if (c) {
        release();
        throw new ImgError('locked', `${filename}: Failed to get "${PERM_NAMES[bit]}" lock: another process is using the image (it does not share ${PERM_NAMES[bit]})`);
      }
    }
    if (!(shared & (1 << bit))) {
      const c = nat.ofdGetLock(fd, PERM_BASE + bit, 1, 'w');
      if (c) {
        release();
        throw new ImgError('locked', `${filename}: Failed to get shared "${PERM_NAMES[bit]}" lock: another process is using the image with ${PERM_NAMES[bit]} permission`);
      }
    }
  }
  debug('locked %s perm=%d shared=%d', filename, perm, shared);
  return release;
}

function autoOff(mode: LockMode, filename: string): null {
  if (mode === 'on') throw new ImgError('io', `locking=on: '${filename}' is on a file system without OFD locks`);
  return null;
}
