// Entry of the background mount server: configuration (secrets included) arrives on stdin,
// never in argv; readiness or the error goes back on fd 3.

// Format I/O that JavaScript serves goes through libuv's pool; requests in flight overlap
// only as far as it has threads (set before the pool's first use).
process.env.UV_THREADPOOL_SIZE ??= '16';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { loadNative, MNT_DETACH } from '../core/native';
import { exitCodeOf, formatError } from '../core/errors';
import { serve, ServeConfig } from '../fuse/serve';

function readStdin(): Promise<string> {
  return new Promise((resolve, reject) => {
    let s = '';
    process.stdin.setEncoding('utf8');
    process.stdin.on('data', (d: string) => { s += d; });
    process.stdin.on('end', () => resolve(s));
    process.stdin.on('error', reject);
  });
}

/** Last resort after a crash: detach the mount so nothing hangs on a dead server. */
function emergencyUnmount(mountpoint: string): void {
  const nat = loadNative();
  if (process.getuid?.() === 0 && nat) nat.umount(mountpoint, MNT_DETACH);
  else spawnSync('fusermount3', ['-u', '-z', '--', mountpoint], { stdio: 'ignore' });
}

async function main(): Promise<void> {
  const cfg = JSON.parse(await readStdin()) as ServeConfig;
  const crash = (e: unknown): void => {
    try { fs.writeSync(2, `${formatError(e)}\n`); } catch { /* no stderr */ }
    emergencyUnmount(cfg.mountpoint);
    process.exit(70);
  };
  process.on('uncaughtException', crash);
  process.on('unhandledRejection', crash);
  let reported = false;
  const report = (err: Error | null, notice?: string): void => {
    if (reported) return;
    reported = true;
    const line = err ? `err ${exitCodeOf(err)} ${formatError(err)}\n` : `ok${notice ? ` ${notice.split('\n')[0]}` : ''}\n`;
    try { fs.writeSync(3, line); fs.closeSync(3); } catch { /* parent gone */ }
  };
  const code = await serve(cfg, report);
  process.exit(code);
}

main().catch((e) => {
  try { fs.writeSync(3, `err ${exitCodeOf(e)} ${formatError(e)}\n`); } catch { /* parent gone */ }
  process.exit(1);
});
