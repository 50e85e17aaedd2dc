// Helpers for the LUKS tests: cryptsetup and qemu-img are the peers.
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { openImage } from '../../lib/core/graph';
import { readAt, writeAt } from '../../lib/core/io';
import type { BlockNode } from '../../lib/core/node';
import { SecretStore } from '../../lib/core/secrets';

export const PASS = 'correct horse battery';

export function have(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
}

export function sh(cmd: string, args: string[], input?: string): string {
  return execFileSync(cmd, args, { encoding: 'utf8', input, stdio: ['pipe', 'pipe', 'pipe'] });
}

export function passFile(dir: string, pass = PASS): string {
  const f = path.join(dir, `pass-${Math.random().toString(36).slice(2)}`);
  fs.writeFileSync(f, pass);
  return f;
}

export function secrets(pass = PASS): SecretStore {
  const s = new SecretStore();
  s.addObject(`secret,id=sec0,data=${pass}`);
  return s;
}

/** cryptsetup luksFormat on a plain file (fast PBKDF) */
export function cryptsetupFormat(dir: string, file: string, size: number, extra: string[], pass = PASS): void {
  fs.writeFileSync(file, Buffer.alloc(0));
  fs.truncateSync(file, size);
  const kf = passFile(dir, pass);
  sh('cryptsetup', ['luksFormat', '--batch-mode', '--key-file', kf, ...extra, file]);
}

/** qemu's view of a LUKS1 image as a Buffer */
export function qemuLuksRaw(dir: string, img: string, pass = PASS, fmt = 'luks'): Buffer {
  const out = path.join(dir, `ref-${Math.random().toString(36).slice(2)}.raw`);
  const kf = passFile(dir, pass);
  const spec = fmt === 'luks' ? `driver=luks,key-secret=s,file.filename=${img}` : `driver=qcow2,encrypt.key-secret=s,file.filename=${img}`;
  sh('qemu-img', ['convert', '--object', `secret,id=s,file=${kf}`, '--image-opts', spec, '-O', 'raw', out]);
  const b = fs.readFileSync(out);
  fs.unlinkSync(out);
  return b;
}

export async function openLuksImage(img: string, readOnly = true, pass = PASS, opt = 'key-secret'): Promise<BlockNode> {
  return openImage(img, { readOnly, secrets: secrets(pass), options: { [opt]: 'sec0' } as never });
}

export async function readAll(node: BlockNode): Promise<Buffer> {
  const b = Buffer.alloc(node.size);
  const chunk = 300 * 1024 + 17;
  for (let o = 0; o < node.size; o += chunk) await readAt(node, b.subarray(o, Math.min(node.size, o + chunk)), o);
  return b;
}

/** deterministic unaligned writes, applied to the node and to a reference buffer */
export async function randomWrites(node: BlockNode, ref: Buffer, seed: number, count = 12): Promise<void> {
  let x = seed;
  const rnd = (n: number): number => { x = (x * 1103515245 + 12345) & 0x7fffffff; return x % n; };
  for (let i = 0; i < count; i++) {
    const len = 1 + rnd(70000);
    const off = rnd(ref.length - len);
    const data = Buffer.alloc(len, (i * 37 + 1) & 0xff);
    for (let k = 0; k < len; k += 97) data[k] = rnd(256);
    await writeAt(node, data, off);
    data.copy(ref, off);
  }
}

export async function errOf(p: Promise<unknown>): Promise<{ kind: string; message: string }> {
  try {
    await p;
    return { kind: 'none', message: '' };
  } catch (e) {
    return { kind: String((e as { kind?: string }).kind ?? 'thrown'), message: (e as Error).message };
  }
}

/** qemu-img create; qemu's PBKDF benchmark sometimes fails under load ("Unable to get accurate
 *  CPU usage"), so that one error is retried */
export function qemuCreate(args: string[]): void {
  for (let attempt = 0; ; attempt++) {
    try {
      sh('qemu-img', ['create', ...args]);
      return;
    } catch (e) {
      // qemu's PBKDF timing fails at random on a busy machine; it is qemu's flake, not ours
      if (attempt >= 30 || !/accurate CPU usage/.test(String(e))) throw e;
      spawnSync('sleep', ['0.05']);
    }
  }
}
