// Shared helpers for the qcow2 differential tests (qemu-img / qemu-io are the peers).
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { openImage } from '../../lib/core/graph';
import { readAt } from '../../lib/core/io';
import type { BlockNode } from '../../lib/core/node';

export function tmpdir(t: { teardown(fn: () => void): void }): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2-test-'));
  t.teardown(() => fs.rmSync(d, { recursive: true, force: true }));
  return d;
}

export function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** qemu-img run in `cwd` (qemu resolves a relative data_file name against the working directory) */
export function qemuImgIn(cwd: string, ...args: string[]): string {
  return execFileSync('qemu-img', args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

export function qemuImgStatus(...args: string[]): { code: number; out: string; err: string } {
  const r = spawnSync('qemu-img', args, { encoding: 'utf8' });
  return { code: r.status ?? -1, out: r.stdout, err: r.stderr };
}

export function qemuIo(file: string, cmds: string[], extra: string[] = []): string {
  const args = [...extra];
  for (const c of cmds) args.push('-c', c);
  args.push(file);
  return execFileSync('qemu-io', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** qemu's guest view of an image as a Buffer */
export function qemuRaw(dir: string, img: string, fmtArgs: string[] = []): Buffer {
  const out = path.join(dir, `ref-${Math.random().toString(36).slice(2)}.raw`);
  qemuImg('convert', ...fmtArgs, '-O', 'raw', img, out);
  const b = fs.readFileSync(out);
  fs.unlinkSync(out);
  return b;
}

export async function readAll(node: BlockNode): Promise<Buffer> {
  const b = Buffer.alloc(node.size);
  // read in odd-sized chunks to exercise unaligned paths
  const chunk = 300 * 1024 + 17;
  for (let o = 0; o < node.size; o += chunk) await readAt(node, b.subarray(o, Math.min(node.size, o + chunk)), o);
  return b;
}

export async function ourView(img: string, opts: Parameters<typeof openImage>[1] = {}): Promise<Buffer> {
  const n = await openImage(img, { readOnly: true, ...opts });
  try {
    return await readAll(n);
  } finally {
    await n.close();
  }
}

export function firstDiff(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) return -2;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

/** the ImgError kind a promise rejects with ('none' if it resolves) */
export async function errKind(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'none';
  } catch (e) {
    return String((e as { kind?: string }).kind ?? (e as Error).message);
  }
}

/** the error message a promise rejects with */
export async function errMessage(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return '';
  } catch (e) {
    return (e as Error).message;
  }
}
