// Differential test steps shared by the qcow, qed, vdi and parallels tests (qemu-img and
// qemu-io are the peers).
import fs from 'node:fs';
import path from 'node:path';
import { openImage } from '../../lib/core/graph';
import { writeAt } from '../../lib/core/io';
import { createImage } from '../../lib/ops/create';
import { main } from '../../lib/cli/main';
import type { OptionTree } from '../../lib/core/options';
import { firstDiff, ourView, qemuImg, qemuImgStatus, qemuIo, qemuRaw } from '../qcow2/helpers';

export { errKind, firstDiff, ourView, qemuImg, qemuImgStatus, qemuIo, qemuRaw } from '../qcow2/helpers';
export { hasCommand, imgmount, tmpdir } from '../helpers';

/** the parts of a tap Test the steps use */
export interface T {
  equal(...a: [unknown, unknown, string]): unknown;
  same(...a: [unknown, unknown, string]): unknown;
  ok(...a: [unknown, string]): unknown;
}

export function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => { s = (s * 1664525 + 1013904223) >>> 0; return s / 2 ** 32; };
}

/** scattered qemu-io pattern writes, some unaligned and crossing cluster/block boundaries */
export function scatteredWrites(size: number): string[] {
  const cmds: string[] = [];
  const r = rng(size);
  for (let i = 0; i < 12; i++) {
    const len = 512 * (1 + Math.floor(r() * 300));
    const off = 512 * Math.floor(r() * ((size - len) / 512));
    cmds.push(`write -P 0x${(0x5a + i).toString(16)} ${off} ${len}`);
  }
  cmds.push(`write -P 0x5a ${size - 4096} 4096`);
  return cmds;
}

/** qemu-img check's exit code (63: no check for this format) */
export function qemuCheck(img: string): { code: number; out: string } {
  const r = qemuImgStatus('check', img);
  return { code: r.code, out: r.out + r.err };
}

/** the CLI run in this process (a child per call costs half a second) */
export async function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  const ow = process.stdout.write.bind(process.stdout);
  const ew = process.stderr.write.bind(process.stderr);
  process.stdout.write = ((s: string | Uint8Array) => { stdout += String(s); return true; }) as typeof process.stdout.write;
  process.stderr.write = ((s: string | Uint8Array) => { stderr += String(s); return true; }) as typeof process.stderr.write;
  try {
    const code = await main(args);
    return { code, stdout, stderr };
  } finally {
    process.stdout.write = ow;
    process.stderr.write = ew;
  }
}

/** `info --output json` of both tools, as printed */
export async function infoBoth(img: string, fmt: string): Promise<[string, string]> {
  const q = qemuImg('info', '--output', 'json', '-f', fmt, img);
  const o = await cli(['info', '--output', 'json', '-f', fmt, img]);
  return [o.stdout || o.stderr, q];
}

/** human `info` of both tools */
export async function infoHumanBoth(img: string, fmt: string): Promise<[string, string]> {
  const q = qemuImg('info', '-f', fmt, img);
  const o = await cli(['info', '-f', fmt, img]);
  return [o.stdout || o.stderr, q];
}

export async function mapBoth(img: string, fmt: string): Promise<[string, string]> {
  const q = qemuImg('map', '--output', 'json', '-f', fmt, img);
  const o = await cli(['map', '--output', 'json', '-f', fmt, img]);
  return [o.stdout || o.stderr, q];
}

/** random unaligned writes through writeAt; returns the expected guest contents */
export async function randomWrites(img: string, fmt: string, ref: Buffer, seed: number, count = 25, maxLen = 150000): Promise<void> {
  const node = await openImage(img, { format: fmt });
  try {
    const r = rng(seed);
    for (let i = 0; i < count; i++) {
      const len = 1 + Math.floor(r() * maxLen);
      const off = Math.floor(r() * (ref.length - len));
      const b = Buffer.alloc(len, (i * 37 + 1) & 0xff);
      for (let k = 0; k < len; k += 97) b[k] = Math.floor(r() * 256);
      await writeAt(node, b, off);
      b.copy(ref, off);
    }
    // the last byte and an unaligned write at the very end
    const tail = Buffer.from('tail!');
    await writeAt(node, tail, ref.length - tail.length);
    tail.copy(ref, ref.length - tail.length);
  } finally {
    await node.close();
  }
}

/** the image equals `ref` for qemu-img compare, for qemu's own view and for ours */
export async function assertContents(t: T, dir: string, img: string, fmt: string, ref: Buffer, what: string): Promise<void> {
  const refFile = path.join(dir, `ref-${Math.random().toString(36).slice(2)}.raw`);
  fs.writeFileSync(refFile, ref);
  const cmp = qemuImgStatus('compare', '-f', fmt, '-F', 'raw', img, refFile);
  t.equal(cmp.code, 0, `${what}: qemu-img compare: ${cmp.out}${cmp.err}`);
  t.equal(firstDiff(qemuRaw(dir, img, ['-f', fmt]), ref), -1, `${what}: qemu reads the reference`);
  t.equal(firstDiff(await ourView(img, { format: fmt }), ref), -1, `${what}: we read the reference`);
  fs.unlinkSync(refFile);
}

/** creates `img` with our create, as the CLI would */
export async function ourCreate(img: string, fmt: string, size: number | null, options: OptionTree = {},
  backing?: string, backingFormat?: string): Promise<void> {
  await createImage({ format: fmt, filename: img, size, options, backing, backingFormat });
}

/** qemu-io writes applied to an image, with the same bytes applied to a reference */
export function qemuWrite(img: string, fmt: string, cmds: string[], ref: Buffer): void {
  qemuIo(img, cmds, ['-f', fmt]);
  for (const c of cmds) {
    const m = /^write -P 0x([0-9a-f]+) (\d+) (\d+)$/.exec(c);
    if (m) ref.fill(parseInt(m[1], 16), Number(m[2]), Number(m[2]) + Number(m[3]));
  }
}

export function patch(file: string, at: number, bytes: Buffer): void {
  const fd = fs.openSync(file, 'r+');
  try { fs.writeSync(fd, bytes, 0, bytes.length, at); } finally { fs.closeSync(fd); }
}

export function u32le(v: number): Buffer { const b = Buffer.alloc(4); b.writeUInt32LE(v >>> 0); return b; }
export function u32be(v: number): Buffer { const b = Buffer.alloc(4); b.writeUInt32BE(v >>> 0); return b; }
export function u64le(v: bigint): Buffer { const b = Buffer.alloc(8); b.writeBigUInt64LE(v); return b; }
export function u64be(v: bigint): Buffer { const b = Buffer.alloc(8); b.writeBigUInt64BE(v); return b; }

/**
 * An image qemu-img created (with `opts`) and filled with scattered qemu-io pattern writes:
 * qemu's view and ours equal the reference, and info (JSON and human) — and the JSON map unless
 * `map` is false — equal qemu-img's. Returns the reference contents.
 */
export async function qemuMadeMatches(t: T, dir: string, img: string, fmt: string, opts: string, size: number,
  map = true): Promise<Buffer> {
  qemuImg('create', '-q', '-f', fmt, ...(opts ? ['-o', opts] : []), img, String(size));
  const ref = Buffer.alloc(size);
  qemuWrite(img, fmt, scatteredWrites(size), ref);
  t.equal(firstDiff(qemuRaw(dir, img), ref), -1, `${opts}: qemu agrees with the reference`);
  t.equal(firstDiff(await ourView(img), ref), -1, `${opts}: we read what qemu wrote`);
  const i = await infoBoth(img, fmt);
  t.equal(i[0], i[1], `${opts}: info --output json equals qemu-img's`);
  const h = await infoHumanBoth(img, fmt);
  t.equal(h[0], h[1], 'human info equals qemu-img\'s');
  if (map) {
    const m = await mapBoth(img, fmt);
    t.equal(m[0], m[1], `${opts}: map --output json equals qemu-img's`);
  }
  return ref;
}
