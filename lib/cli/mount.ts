// `imgmount mount`: validates, then starts the server in the background (or in the
// foreground) and returns once disk.raw is ready.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ImgError } from '../core/errors';
import { findMount, runtimeDir } from '../fuse/runtime';
import { serve, ServeConfig } from '../fuse/serve';

export async function mountCommand(cfg: ServeConfig, foreground: boolean, debugLog: boolean): Promise<number> {
  const mnt = path.resolve(cfg.mountpoint);
  cfg.mountpoint = mnt;
  if (findMount(mnt)) throw new ImgError('locked', `mount ${mnt}: something is already mounted there`);
  if (!fs.existsSync(mnt)) {
    try {
      fs.mkdirSync(mnt, { recursive: true });
    } catch (e) {
      throw new ImgError('usage', `mount ${mnt}: cannot create the mountpoint: ${(e as NodeJS.ErrnoException).code ?? ''}`);
    }
    cfg.createdMountpoint = true;
  } else if (!fs.statSync(mnt).isDirectory()) {
    throw new ImgError('usage', `mount ${mnt}: not a directory`);
  }
  const cleanupDir = (): void => {
    if (cfg.createdMountpoint) { try { fs.rmdirSync(mnt); } catch { /* in use */ } }
  };
  if (foreground) {
    let startErr: Error | null = null;
    const code = await serve(cfg, (err, notice) => {
      startErr = err;
      if (notice) process.stderr.write(`${notice}\n`);
    });
    if (startErr) { cleanupDir(); throw startErr; }
    return code;
  }
  let logFd: number | 'ignore' = 'ignore';
  if (debugLog) {
    fs.mkdirSync(runtimeDir(), { recursive: true, mode: 0o700 });
    const logPath = path.join(runtimeDir(), `server-${path.basename(mnt)}.log`);
    logFd = fs.openSync(logPath, 'a');
    process.stderr.write(`imgmount: server log: ${logPath}\n`);
  }
  const child = spawn(process.execPath, [path.join(__dirname, 'serve-child.js')], {
    detached: true,
    stdio: ['pipe', 'ignore', logFd, 'pipe'],
    env: process.env,
  });
  if (typeof logFd === 'number') fs.closeSync(logFd);
  child.stdin!.end(JSON.stringify(cfg));
  const status = await new Promise<string>((resolve) => {
    let s = '';
    const pipe = child.stdio[3] as NodeJS.ReadableStream;
    pipe.setEncoding('utf8');
    pipe.on('data', (d: string) => { s += d; if (s.includes('\n')) resolve(s); });
    pipe.on('end', () => resolve(s));
    child.on('exit', (code) => resolve(s || `err 5 imgmount: mount: the server exited (${code ?? 'signal'}) before the mount was ready`));
  });
  (child.stdio[3] as NodeJS.ReadableStream & { destroy(): void }).destroy();
  child.unref();
  if (status.startsWith('ok')) {
    const notice = status.slice(2).trim();
    if (notice) process.stderr.write(`${notice}\n`);
    return 0;
  }
  cleanupDir();
  const m = /^err (\d+) (.*)/.exec(status.trim());
  const code = m ? Number(m[1]) : 5;
  process.stderr.write(`${m ? m[2] : `imgmount: mount: ${status.trim()}`}\n`);
  return code;
}
