// Runtime state of background servers: one JSON file per mountpoint, so `unmount` finds the
// server to wait for, and /proc/self/mountinfo for what the kernel has mounted.
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export interface MountState {
  pid: number;
  mountpoint: string;
  image: string;
  createdMountpoint: boolean;
  started: number;
}

export function runtimeDir(): string {
  if (process.getuid?.() === 0) return '/run/imgmount';
  const xdg = process.env.XDG_RUNTIME_DIR;
  return xdg ? path.join(xdg, 'imgmount') : path.join(os.tmpdir(), `imgmount-${process.getuid?.() ?? 0}`);
}

function stateBase(mountpoint: string): string {
  const h = crypto.createHash('sha256').update(mountpoint).digest('hex').slice(0, 20);
  return path.join(runtimeDir(), h);
}

function stateFile(mountpoint: string): string { return `${stateBase(mountpoint)}.json`; }

/** The server's control socket (commit of a -s mount). */
export function controlSocket(mountpoint: string): string { return `${stateBase(mountpoint)}.sock`; }

export function writeState(st: MountState): void {
  fs.mkdirSync(runtimeDir(), { recursive: true, mode: 0o700 });
  const f = stateFile(st.mountpoint);
  fs.writeFileSync(`${f}.tmp`, JSON.stringify(st));
  fs.renameSync(`${f}.tmp`, f);
}

export function readState(mountpoint: string): MountState | null {
  try {
    return JSON.parse(fs.readFileSync(stateFile(mountpoint), 'utf8')) as MountState;
  } catch {
    return null;
  }
}

export function removeState(mountpoint: string, pid?: number): void {
  const st = readState(mountpoint);
  if (st && pid !== undefined && st.pid !== pid) return;
  try { fs.unlinkSync(stateFile(mountpoint)); } catch { /* already gone */ }
  // a server that was killed left its control socket behind (one that exits closes it)
  try { fs.unlinkSync(controlSocket(mountpoint)); } catch { /* already gone */ }
}

export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
  // a zombie counts as gone
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/\) Z /.test(stat);
  } catch {
    return false;
  }
}

export interface MountInfo { mountpoint: string; fstype: string; source: string; dev: string }

function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_m, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** The mount at exactly this path, from /proc/self/mountinfo (the last one wins when stacked). */
export function findMount(mountpoint: string): MountInfo | null {
  let text = '';
  try { text = fs.readFileSync('/proc/self/mountinfo', 'utf8'); } catch { return null; }
  let found: MountInfo | null = null;
  for (const line of text.split('\n')) {
    if (!line) continue;
    const parts = line.split(' ');
    const sep = parts.indexOf('-');
    if (sep < 0) continue;
    const mp = unescapeMount(parts[4]);
    if (mp !== mountpoint) continue;
    found = { mountpoint: mp, dev: parts[2], fstype: parts[sep + 1], source: unescapeMount(parts[sep + 2] ?? '') };
  }
  return found;
}
