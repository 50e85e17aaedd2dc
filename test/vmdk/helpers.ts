// Helpers for the vmdk tests: qemu-img/qemu-io wrappers and our own view of an image.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { openImage } from '../../lib/core/graph';
import { readAt, writeAt } from '../../lib/core/io';
import type { BlockNode } from '../../lib/core/node';
import type { OptionTree } from '../../lib/core/options';

export function tmpdir(t: { teardown(fn: () => void): void }): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'imgmount-vmdk-'));
  t.teardown(() => fs.rmSync(d, { recursive: true, force: true }));
  return d;
}

export function sh(cmd: string, args: string[], okCodes = [0]): { code: number; out: string; err: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20 });
  if (r.error) throw r.error;
  const code = r.status ?? -1;
  if (!okCodes.includes(code)) throw new Error(`${cmd} ${args.join(' ')} -> ${code}: ${r.stderr}${r.stdout}`);
  return { code, out: r.stdout, err: r.stderr };
}

export const qemuImg = (...a: string[]): string => sh('qemu-img', a).out;
export const qemuIo = (img: string, fmt: string, cmds: string[]): string =>
  sh('qemu-io', ['-f', fmt, ...cmds.flatMap((c) => ['-c', c]), img]).out;

/** the guest bytes as qemu sees them */
export function qemuRaw(img: string, dir: string, fmt = 'vmdk'): Buffer {
  const out = path.join(dir, `qemu-${path.basename(img)}-${Date.now()}.raw`);
  sh('qemu-img', ['convert', '-U', '-f', fmt, '-O', 'raw', img, out]);
  const b = fs.readFileSync(out);
  fs.unlinkSync(out);
  return b;
}

export async function withImage<T>(img: string, o: { readOnly?: boolean; options?: OptionTree; format?: string }, fn: (n: BlockNode) => Promise<T>): Promise<T> {
  const n = await openImage(img, { format: o.format ?? 'vmdk', readOnly: o.readOnly ?? true, options: o.options });
  try { return await fn(n); } finally { await n.close(); }
}

export async function ourRaw(img: string, options?: OptionTree): Promise<Buffer> {
  return withImage(img, { options }, async (n) => {
    const b = Buffer.alloc(n.size);
    await readAt(n, b, 0);
    return b;
  });
}

/** deterministic pseudo-random generator */
export function rng(seed: number): (m: number) => number {
  let x = seed >>> 0 || 1;
  return (m: number) => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return x % m; };
}

/** random unaligned writes through writeAt, mirrored into `ref`; sequential for streamOptimized */
export async function randomWrites(img: string, ref: Buffer, seed: number, count: number, sequential = false): Promise<void> {
  const r = rng(seed);
  await withImage(img, { readOnly: false }, async (n) => {
    let pos = r(4096);
    for (let i = 0; i < count; i++) {
      const len = 1 + r(100000);
      const off = sequential ? pos : r(n.size - len);
      if (off + len > n.size) break;
      pos = off + len + r(150000);
      const b = Buffer.alloc(len);
      for (let j = 0; j < len; j += 97) b[j] = 1 + r(255);
      b.fill(1 + r(255), 0, Math.min(len, 300));
      await writeAt(n, b, off);
      b.copy(ref, off);
    }
  });
}

export function firstDiff(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) return -2;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

export const SUBFORMATS = ['monolithicSparse', 'monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat', 'streamOptimized'] as const;

export const hasQemu = spawnSync('sh', ['-c', 'command -v qemu-img && command -v qemu-io']).status === 0;

/** the ImgError kind a promise rejects with ('resolved' if it does not) */
export async function kindOf(p: Promise<unknown>): Promise<string> {
  try { await p; return 'resolved'; } catch (e) { return (e as { kind?: string }).kind ?? `plain error: ${(e as Error).message}`; }
}
