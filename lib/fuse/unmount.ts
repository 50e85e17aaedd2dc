// `imgmount unmount`: unmount, wait for the server to flush and exit, remove what mount made.
import fs from 'node:fs';
import path from 'node:path';
import { ImgError } from '../core/errors';
import { findMount, processAlive, readState, removeState } from './runtime';
import { kernelUnmount } from './serve';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Writes 1 to the connection's abort file so a server stuck on a busy mount lets go. */
function abortConnection(dev: string): void {
  const minor = dev.split(':')[1];
  try { fs.writeFileSync(`/sys/fs/fuse/connections/${minor}/abort`, '1'); } catch { /* not mounted or no fusectl */ }
}

export async function unmount(mountpointArg: string, force: boolean, timeoutMs = 120000): Promise<void> {
  const mountpoint = path.resolve(mountpointArg);
  const st = readState(mountpoint);
  const m = findMount(mountpoint);
  if (!m && !st) throw new ImgError('usage', `unmount ${mountpoint}: not mounted`);
  if (m && !m.fstype.startsWith('fuse')) throw new ImgError('usage', `unmount ${mountpoint}: not an imgmount mount (${m.fstype})`);
  if (m) {
    let err = await kernelUnmount(mountpoint, false);
    if (err === 16) {
      if (!force) throw new ImgError('locked', `unmount ${mountpoint}: target is busy (files are open; use --force)`);
      err = await kernelUnmount(mountpoint, true);
      abortConnection(m.dev);
      // the detached mount still serves open files; tell the server to stop serving them
      if (st && processAlive(st.pid)) { try { process.kill(st.pid, 'SIGTERM'); } catch { /* gone */ } }
    }
    if (err && findMount(mountpoint)) {
      throw new ImgError('io', `unmount ${mountpoint}: failed (error ${err})`);
    }
  }
  if (st) {
    const deadline = Date.now() + timeoutMs;
    while (processAlive(st.pid)) {
      if (Date.now() > deadline) throw new ImgError('io', `unmount ${mountpoint}: the server (pid ${st.pid}) did not exit`);
      await sleep(20);
    }
    removeState(mountpoint);
    if (st.createdMountpoint) {
      try { fs.rmdirSync(mountpoint); } catch { /* removed by the server already, or not empty */ }
    }
  }
}
