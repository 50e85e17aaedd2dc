// A small control channel to a running server: one JSON request line, one JSON reply line,
// over a unix socket in the runtime directory (mode 0700, owner only).
import fs from 'node:fs';
import net from 'node:net';
import { ImgError, ErrorKind } from '../core/errors';
import { controlSocket, runtimeDir } from './runtime';

export interface ControlRequest { op: 'commit' | 'ping' }
export interface ControlReply { ok: boolean; kind?: ErrorKind; message?: string }

export function startControl(mountpoint: string, handle: (r: ControlRequest) => Promise<void>): net.Server {
  fs.mkdirSync(runtimeDir(), { recursive: true, mode: 0o700 });
  const sock = controlSocket(mountpoint);
  try { fs.unlinkSync(sock); } catch { /* none */ }
  const server = net.createServer((c) => {
    let buf = '';
    c.setEncoding('utf8');
    c.on('data', (d: string) => {
      buf += d;
      if (buf.length > 4096) { c.destroy(); return; }
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      let req: ControlRequest;
      try { req = JSON.parse(buf.slice(0, nl)) as ControlRequest; } catch { c.end('{"ok":false,"kind":"usage","message":"bad request"}\n'); return; }
      handle(req).then(
        () => c.end(`${JSON.stringify({ ok: true })}\n`),
        (e: unknown) => c.end(`${JSON.stringify({ ok: false, kind: e instanceof ImgError ? e.kind : 'io', message: (e as Error).message })}\n`),
      );
    });
    c.on('error', () => undefined);
  });
  server.listen(sock);
  server.unref();
  fs.chmodSync(runtimeDir(), 0o700);
  return server;
}

export function stopControl(server: net.Server, mountpoint: string): void {
  server.close();
  try { fs.unlinkSync(controlSocket(mountpoint)); } catch { /* gone */ }
}

export function controlRequest(mountpoint: string, req: ControlRequest, timeoutMs = 3600000): Promise<void> {
  return new Promise((resolve, reject) => {
    const c = net.connect(controlSocket(mountpoint));
    let buf = '';
    const timer = setTimeout(() => { c.destroy(); reject(new ImgError('io', `${mountpoint}: the server did not answer`)); }, timeoutMs);
    c.setEncoding('utf8');
    c.on('connect', () => c.write(`${JSON.stringify(req)}\n`));
    c.on('data', (d: string) => { buf += d; });
    c.on('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(new ImgError('usage', `${mountpoint}: no imgmount server answers (${e.code ?? e.message})`));
    });
    c.on('end', () => {
      clearTimeout(timer);
      try {
        const r = JSON.parse(buf.trim()) as ControlReply;
        if (r.ok) resolve();
        else reject(new ImgError(r.kind ?? 'io', r.message ?? 'failed'));
      } catch {
        reject(new ImgError('io', `${mountpoint}: bad answer from the server`));
      }
    });
  });
}
