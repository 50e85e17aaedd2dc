// Shared test helpers. Every client of a mount (dd, cmp, python3) runs in a child process:
// the test process never touches a mount, and every mount is unmounted in teardown.
import { spawn, spawnSync, SpawnSyncReturns } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export const ROOT = path.resolve(__dirname, '..', '..');
export const BIN = path.join(ROOT, 'bin', 'imgmount');

export interface Run { code: number; stdout: string; stderr: string }

export function run(cmd: string, args: string[], opts: { input?: string; timeout?: number; env?: NodeJS.ProcessEnv } = {}): Run {
  const r: SpawnSyncReturns<string> = spawnSync(cmd, args, {
    encoding: 'utf8', input: opts.input, timeout: opts.timeout ?? 120000, env: opts.env ?? process.env,
    maxBuffer: 64 << 20,
  });
  if (r.error) throw r.error;
  return { code: r.status ?? (r.signal ? 128 : -1), stdout: r.stdout, stderr: r.stderr };
}

export function imgmount(args: string[], opts: { input?: string; timeout?: number; env?: NodeJS.ProcessEnv } = {}): Run {
  return run(process.execPath, [BIN, ...args], opts);
}

export function hasCommand(c: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${c}`]).status === 0;
}

export function tmpdir(t: { teardown(fn: () => void | Promise<void>): void }, prefix = 'imgmount-test-'): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.teardown(() => {
    unmountAllUnder(d);
    fs.rmSync(d, { recursive: true, force: true });
  });
  return d;
}

/** Lazily unmounts anything still mounted below dir (a failed test must not leave mounts). */
export function unmountAllUnder(dir: string): void {
  const mounts = fs.readFileSync('/proc/mounts', 'utf8').split('\n').map((l) => l.split(' ')[1]).filter(Boolean);
  for (const m of mounts) {
    const mp = m.replace(/\\040/g, ' ');
    if (mp === dir || mp.startsWith(dir + '/')) {
      const r = imgmount(['unmount', '--force', mp], { timeout: 30000 });
      if (r.code !== 0) spawnSync('umount', ['-l', mp]);
    }
  }
}

export function randomFile(file: string, size: number, seed = 1): Buffer {
  const buf = Buffer.alloc(size);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < size; i += 4) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    buf.writeUInt32LE(x >>> 0, i);
  }
  fs.writeFileSync(file, buf);
  return buf;
}

export function sha256(buf: Uint8Array): string {
  return crypto.createHash('sha256').update(buf).digest('hex');
}

/** sha256 of a file, computed by a child process (safe for files on a mount). */
export function childSha256(file: string): string {
  const r = run('sha256sum', [file]);
  if (r.code !== 0) throw new Error(`sha256sum ${file}: ${r.stderr}`);
  return r.stdout.split(' ')[0];
}

/** Runs a python3 snippet in a child; argv[1..] are the extra args. */
export function py(code: string, args: string[] = [], input?: string): Run {
  return run('python3', ['-c', code, ...args], { input });
}

export function isMounted(mountpoint: string): boolean {
  return fs.readFileSync('/proc/mounts', 'utf8').split('\n').some((l) => l.split(' ')[1] === mountpoint);
}

export function mount(t: { teardown(fn: () => void | Promise<void>): void }, image: string, mnt: string, extra: string[] = []): Run {
  const r = imgmount(['mount', ...extra, image, mnt], { timeout: 60000 });
  if (r.code === 0) {
    t.teardown(() => {
      if (isMounted(mnt)) imgmount(['unmount', '--force', mnt], { timeout: 60000 });
    });
  }
  return r;
}

/** Starts a long-running child (qemu-io, qemu-storage-daemon, a holder of an open fd); killed in teardown. */
export function background(t: { teardown(fn: () => void | Promise<void>): void }, cmd: string, args: string[]): ReturnType<typeof spawn> {
  const p = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  p.stdout?.on('data', (d: Buffer) => { out += d.toString(); });
  p.stderr?.on('data', (d: Buffer) => { out += d.toString(); });
  (p as unknown as { output: () => string }).output = () => out;
  t.teardown(() => new Promise<void>((resolve) => {
    if (p.exitCode !== null || p.signalCode !== null) { resolve(); return; }
    p.once('exit', () => resolve());
    p.kill('SIGKILL');
  }));
  return p;
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** the pid of the server behind a mount, from its runtime state file */
export function serverPid(mnt: string): number | null {
  const dir = '/run/imgmount';
  if (!fs.existsSync(dir)) return null;
  for (const f of fs.readdirSync(dir).filter((n) => n.endsWith('.json'))) {
    try {
      const s = JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8')) as { pid: number; mountpoint: string };
      if (s.mountpoint === mnt) return s.pid;
    } catch { /* being rewritten */ }
  }
  return null;
}

/** Runs the Python `writer` (argv[1]: the mounted disk) in the background, kills the server
 *  with SIGKILL after `ms`, waits for the writer to fail, and unmounts the dead mount. */
export async function killServerWhileWriting(mnt: string, writer: string, ms: number): Promise<{ pid: number | null; unmount: Run }> {
  const pid = serverPid(mnt);
  const w = spawn('python3', ['-c', writer, path.join(mnt, 'disk.raw')], { stdio: 'ignore' });
  await sleep(ms);
  if (pid !== null) process.kill(pid, 'SIGKILL');
  else w.kill('SIGKILL');
  await waitFor(() => w.exitCode !== null || w.signalCode !== null, 10000);
  return { pid, unmount: imgmount(['unmount', mnt]) };
}

export async function waitFor(cond: () => boolean, ms = 10000, step = 50): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return true;
    await sleep(step);
  }
  return cond();
}

/**
 * A python3 client that applies the same pseudo-random unaligned writes (some with zero
 * runs) to every file it is given, reads random ranges back from the first and the second
 * and compares them, fsyncs now and then, and prints "ok".
 */
const MIRROR_WRITER = `
import os, random, sys
seed, n, maxlen = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
files = sys.argv[4:]
fds = [os.open(f, os.O_RDWR) for f in files]
size = os.fstat(fds[0]).st_size
r = random.Random(seed)
for i in range(n):
    off = r.randrange(0, size - 1)
    ln = r.randrange(1, min(maxlen, size - off) + 1)
    data = ((bytes(r.getrandbits(8) for _ in range(61)) + bytes(3)) * (ln // 64 + 1))[:ln]
    for fd in fds:
        assert os.pwrite(fd, data, off) == ln
    o2 = r.randrange(0, size - 1); l2 = r.randrange(1, min(maxlen, size - o2) + 1)
    assert os.pread(fds[0], l2, o2) == os.pread(fds[1], l2, o2), "mismatch at %d+%d" % (o2, l2)
    if i % 40 == 0:
        os.fsync(fds[0])
for fd in fds:
    os.fsync(fd); os.close(fd)
print("ok")
`;

export function mirrorWrites(seed: number, count: number, files: string[], maxLen = 200000): Run {
  return py(MIRROR_WRITER, [String(seed), String(count), String(maxLen), ...files]);
}
