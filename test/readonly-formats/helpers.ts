// Helpers for the read-only format tests (bochs, cloop, dmg): peers, temp dirs, whole-image reads.
import { execFileSync, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { openImage } from '../../lib/core/graph';
import { readAt } from '../../lib/core/io';
import type { BlockNode } from '../../lib/core/node';
import { ImgError } from '../../lib/core/errors';

export const IMAGES = path.resolve(__dirname, '../../../images');
export const SHARED_DMG = '/work/shared/images/dmg';

export function tmpdir(t: { teardown(fn: () => void): void }): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'rofmt-test-'));
  t.teardown(() => fs.rmSync(d, { recursive: true, force: true }));
  return d;
}

export function have(tool: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${tool}`], { encoding: 'utf8' }).status === 0;
}

export function run(cmd: string, args: string[], cwd?: string): string {
  return execFileSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], maxBuffer: 64 << 20 });
}

/** qemu's guest view, via qemu-img convert -O raw */
export function qemuRaw(dir: string, img: string, fmt: string): Buffer {
  const out = path.join(dir, `ref-${crypto.randomBytes(4).toString('hex')}.raw`);
  run('qemu-img', ['convert', '-f', fmt, '-O', 'raw', img, out]);
  const b = fs.readFileSync(out);
  fs.unlinkSync(out);
  return b;
}

export async function readAll(node: BlockNode): Promise<Buffer> {
  const b = Buffer.alloc(node.size);
  const chunk = 300 * 1024 + 17; // odd sizes exercise unaligned paths
  for (let o = 0; o < node.size; o += chunk) await readAt(node, b.subarray(o, Math.min(node.size, o + chunk)), o);
  return b;
}

export async function ourView(img: string, format?: string): Promise<Buffer> {
  const n = await openImage(img, { readOnly: true, format });
  try {
    return await readAll(n);
  } finally {
    await n.close();
  }
}

export const sha256 = (b: Buffer): string => crypto.createHash('sha256').update(b).digest('hex');

/** the ImgError a promise (or function) fails with; a non-ImgError or success fails the test */
export async function imgError(p: Promise<unknown> | (() => unknown)): Promise<ImgError | string> {
  try {
    await (typeof p === 'function' ? p() : p);
    return 'no error';
  } catch (e) {
    if (e instanceof ImgError) return e;
    return `not an ImgError: ${(e as Error)?.stack ?? String(e)}`;
  }
}

/** opens and reads the whole image; resolves to the error it gives */
export async function openAndRead(img: string, format: string): Promise<ImgError | string> {
  return imgError(async () => {
    const n = await openImage(img, { readOnly: true, format });
    try {
      await readAll(n);
    } finally {
      await n.close();
    }
  });
}

export function patch(file: string, at: number, bytes: Buffer): void {
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, bytes, 0, bytes.length, at);
  fs.closeSync(fd);
}

export function bin(cmd: string): string { return path.resolve(__dirname, '../../../bin', cmd); }

/** runs our CLI; returns code, stdout, stderr */
export function imgmount(args: string[]): { code: number; out: string; err: string } {
  const r = spawnSync(process.execPath, [bin('imgmount'), ...args], { encoding: 'utf8' });
  return { code: r.status ?? -1, out: r.stdout, err: r.stderr };
}
