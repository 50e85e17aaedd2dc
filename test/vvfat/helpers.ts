// Helpers for the virtual FAT disk tests: sample trees, dumping the synthesized disk into a
// raw file (only the extents that hold data), and the mtools / fsck.fat peers.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { blockStatusAt, readAt } from '../../lib/core/io';
import type { BlockNode } from '../../lib/core/node';
import { hasCommand, randomFile, run, Run } from '../helpers';

export const MT_ENV = { ...process.env, MTOOLS_SKIP_CHECK: '1', MTOOLS_NO_VFAT: '', LC_ALL: 'C.UTF-8' };

export function peersMissing(): string | false {
  for (const c of ['mcopy', 'mdir', 'fsck.fat']) if (!hasCommand(c)) return `${c} is not installed (apt-get install -y mtools dosfstools)`;
  return false;
}

/** A tree with nested dirs, long, non-ASCII and colliding names, a 3 MB file and empty files. */
export function sampleTree(dir: string, big = true): void {
  fs.mkdirSync(path.join(dir, 'sub', 'deeper', 'deepest', 'level4', 'level5'), { recursive: true });
  fs.writeFileSync(path.join(dir, 'a.txt'), 'hello\n');
  fs.writeFileSync(path.join(dir, 'README.TXT'), 'upper case 8.3\n');
  fs.writeFileSync(path.join(dir, 'A long file name with spaces and more than 26 characters.markdown'), 'long\n');
  fs.writeFileSync(path.join(dir, 'ünïcödé ✓ 日本語.txt'), 'ü\n');
  fs.writeFileSync(path.join(dir, 'empty'), '');
  fs.writeFileSync(path.join(dir, 'sub', 'empty too.dat'), '');
  for (let i = 1; i <= 12; i++) fs.writeFileSync(path.join(dir, `collide name ${i}.txt`), `${i}\n`);
  fs.writeFileSync(path.join(dir, 'x+y=z;[1].a,b'), 'invalid short chars\n');
  fs.writeFileSync(path.join(dir, '.hidden'), 'dot file\n');
  fs.writeFileSync(path.join(dir, 'sub', 'deeper', 'deepest', 'level4', 'level5', 'deep file.bin'), Buffer.alloc(20000, 7));
  if (big) randomFile(path.join(dir, 'big.bin'), 3000000, 11);
  fs.writeFileSync(path.join(dir, 'ro.txt'), 'read only\n');
  fs.chmodSync(path.join(dir, 'ro.txt'), 0o444);
}

const ZERO = Buffer.alloc(1 << 20);

/** Writes the node's guest-visible bytes into a sparse raw file. */
export async function dumpNode(node: BlockNode, file: string): Promise<void> {
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, node.size);
    let off = 0;
    while (off < node.size) {
      const ext = await blockStatusAt(node, off, Math.min(node.size - off, 1 << 30));
      if (ext.state === 'data') {
        for (let p = off; p < off + ext.length; p += 1 << 20) {
          const buf = Buffer.alloc(Math.min(1 << 20, off + ext.length - p));
          await readAt(node, buf, p);
          if (!buf.equals(ZERO.subarray(0, buf.length))) fs.writeSync(fd, buf, 0, buf.length, p);
        }
      }
      off += ext.length;
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** Writes every 1 MiB chunk that differs between the raw file and the node into the node. */
export async function writeBack(node: BlockNode, file: string, write: (buf: Buffer, off: number) => Promise<void>): Promise<number> {
  const fd = fs.openSync(file, 'r');
  let n = 0;
  try {
    const a = Buffer.alloc(1 << 20);
    const b = Buffer.alloc(1 << 20);
    for (let off = 0; off < node.size; off += a.length) {
      const len = Math.min(a.length, node.size - off);
      fs.readSync(fd, a, 0, len, off);
      await readAt(node, b.subarray(0, len), off);
      if (!a.subarray(0, len).equals(b.subarray(0, len))) { await write(Buffer.from(a.subarray(0, len)), off); n++; }
    }
  } finally {
    fs.closeSync(fd);
  }
  return n;
}

export function partOffset(file: string): number {
  const mbr = Buffer.alloc(512);
  const fd = fs.openSync(file, 'r');
  fs.readSync(fd, mbr, 0, 512, 0);
  fs.closeSync(fd);
  // a floppy starts with the boot sector (jump instruction), a hard disk with our MBR
  if (mbr[0] === 0xeb) return 0;
  return mbr.readUInt32LE(0x1be + 8) * 512;
}

export function mt(cmd: string, args: string[]): Run {
  return run(cmd, args, { env: MT_ENV });
}

export function img(file: string): string {
  const off = partOffset(file);
  return off ? `${file}@@${off}` : file;
}

/** fsck.fat -n on the partition (extracted with dd semantics) */
export function fsck(file: string, work: string): Run {
  const off = partOffset(file);
  let target = file;
  if (off) {
    target = path.join(work, 'part.raw');
    run('dd', [`if=${file}`, `of=${target}`, 'bs=1M', 'iflag=skip_bytes', `skip=${off}`, 'conv=sparse', 'status=none']);
  }
  const r = run('fsck.fat', ['-n', target]);
  if (target !== file) fs.rmSync(target, { force: true });
  return r;
}

/** mcopy -s of the whole disk into outDir */
export function extract(file: string, outDir: string): Run {
  fs.mkdirSync(outDir, { recursive: true });
  return mt('mcopy', ['-s', '-n', '-m', '-i', img(file), '::/', outDir + '/']);
}

export function diffTrees(a: string, b: string): Run {
  return run('diff', ['-r', a, b]);
}

/** how a promise fails: { kind, message } of the ImgError ('none' when it resolves) */
export async function failure(p: Promise<unknown>): Promise<{ kind: string; message: string }> {
  try {
    const v = await p;
    const c = (v as { close?: () => Promise<void> } | null)?.close;
    if (c) await c.call(v).catch(() => undefined);
    return { kind: 'none', message: '' };
  } catch (e) {
    return { kind: String((e as { kind?: string }).kind ?? 'none'), message: (e as Error).message };
  }
}

/** every path below dir with its type, mode and content hash */
export function snapshot(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string, rel: string): void => {
    for (const n of fs.readdirSync(d).sort()) {
      const p = path.join(d, n);
      const st = fs.lstatSync(p);
      const r = rel ? `${rel}/${n}` : n;
      if (st.isDirectory()) { out.push(`${r}/ ${st.mode.toString(8)}`); walk(p, r); }
      else out.push(`${r} ${st.mode.toString(8)} ${crypto.createHash('sha256').update(fs.readFileSync(p)).digest('hex')}`);
    }
  };
  walk(dir, '');
  return out;
}

