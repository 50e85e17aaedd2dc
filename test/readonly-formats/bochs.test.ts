import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { openImage } from '../../lib/core/graph';
import { ImgError } from '../../lib/core/errors';
import { imageInfo } from '../../lib/ops/info';
import { convertImage } from '../../lib/ops/convert';
import { IMAGES, have, imgmount, openAndRead, ourView, patch, qemuRaw, readAll, run, sha256, tmpdir } from './helpers';

const SAMPLE = path.join(IMAGES, 'bochs-growing.img');
const SAMPLE_SHA = '69271f5e7bde958cebecedff71d2c5bcecdaf00aee654bb6aaae15920d144820';
const le32 = (v: number): Buffer => { const b = Buffer.alloc(4); b.writeUInt32LE(v >>> 0); return b; };
const le64 = (v: number): Buffer => { const b = Buffer.alloc(8); b.writeBigUInt64LE(BigInt(v)); return b; };

t.test('the sample reads as qemu reads it, probed by its header; info', async (t) => {
  const dir = tmpdir(t);
  const n = await openImage(SAMPLE, { readOnly: true });
  t.equal(n.driver, 'bochs', 'probed');
  const b = await readAll(n);
  await n.close();
  t.equal(sha256(b), SAMPLE_SHA);
  t.ok(b.equals(qemuRaw(dir, SAMPLE, 'bochs')), 'equal to qemu-img convert');
  const theirs = JSON.parse(run('qemu-img', ['info', '--output', 'json', SAMPLE]));
  const [ours] = await imageInfo(SAMPLE, {}, false);
  t.same(JSON.parse(JSON.stringify(ours)), theirs, 'info JSON');
});

t.test('bximage growing images, empty and with data', { skip: have('bximage') ? false : 'bximage not installed' }, async (t) => {
  const dir = tmpdir(t);
  const empty = path.join(dir, 'empty.img');
  spawnSync('bximage', ['-q', '-func=create', '-hd=10M', '-imgmode=growing', empty], { stdio: 'ignore' });
  const e = await ourView(empty, 'bochs');
  t.ok(e.equals(qemuRaw(dir, empty, 'bochs')), 'empty: equal to qemu-img');
  t.ok(e.every((x) => x === 0), 'empty: zeros');
  const flat = path.join(dir, 'flat.img');
  spawnSync('bximage', ['-q', '-func=create', '-hd=10M', '-imgmode=flat', flat], { stdio: 'ignore' });
  const fd = fs.openSync(flat, 'r+');
  for (const [off, len] of [[0, 700], [5000, 40000], [(1 << 20) - 100, 300], [7 << 20, 65536]]) {
    const buf = Buffer.alloc(len);
    for (let i = 0; i < len; i++) buf[i] = (i * 31 + off) & 0xff || 1;
    fs.writeSync(fd, buf, 0, len, off);
  }
  fs.closeSync(fd);
  const grow = path.join(dir, 'grow.img');
  spawnSync('bximage', ['-q', '-func=convert', '-imgmode=growing', flat, grow], { stdio: 'ignore' });
  const g = await ourView(grow, 'bochs');
  t.ok(g.equals(fs.readFileSync(flat)), 'equal to the flat source');
  t.ok(g.equals(qemuRaw(dir, grow, 'bochs')), 'equal to qemu-img');
});

t.test('version 1 headers (disk size at 84)', async (t) => {
  const dir = tmpdir(t);
  const f = path.join(dir, 'v1.img');
  fs.copyFileSync(SAMPLE, f);
  const h = fs.readFileSync(f).subarray(0, 512);
  const disk = Number(h.readBigUInt64LE(88));
  patch(f, 64, le32(0x00010000));
  patch(f, 84, le64(disk));
  patch(f, 92, Buffer.alloc(4));
  const ours = await ourView(f);
  t.equal(sha256(ours), SAMPLE_SHA, 'same disk');
  t.ok(ours.equals(qemuRaw(dir, f, 'bochs')), 'equal to qemu-img');
});

t.test('map: data extents point at the host bytes; unallocated extents are zero', async (t) => {
  const r = imgmount(['map', '--output', 'json', SAMPLE]);
  t.equal(r.code, 0, r.err);
  const ext = JSON.parse(r.out) as { start: number; length: number; data: boolean; zero: boolean; offset?: number }[];
  let pos = 0;
  for (const e of ext) { t.equal(e.start, pos, 'contiguous'); pos += e.length; }
  const disk = await ourView(SAMPLE);
  t.equal(pos, disk.length, 'covers the disk');
  const file = fs.readFileSync(SAMPLE);
  const data = ext.filter((e) => e.data);
  t.ok(data.length >= 5, 'several data extents');
  for (const e of data) t.ok(e.offset !== undefined && file.subarray(e.offset, e.offset + e.length).equals(disk.subarray(e.start, e.start + e.length)), `host bytes at ${e.offset}`);
  for (const e of ext.filter((x) => !x.data)) t.ok(disk.subarray(e.start, e.start + e.length).every((x) => x === 0), `zero at ${e.start}`);
});

t.test('convert out of bochs; always read-only', async (t) => {
  const dir = tmpdir(t);
  const out = path.join(dir, 'x.qcow2');
  await convertImage({ src: SAMPLE, srcOpen: {}, dst: out, outFormat: 'qcow2' });
  run('qemu-img', ['check', out]);
  t.equal(sha256(qemuRaw(dir, out, 'qcow2')), SAMPLE_SHA, 'qemu reads the converted image');
  const copy = path.join(dir, 'c.img');
  fs.copyFileSync(SAMPLE, copy);
  const n = await openImage(copy, { readOnly: false });
  t.equal(n.readOnly, true);
  t.equal(n.write, undefined);
  const st = await n.blockStatus(0, n.size);
  t.equal(st.host?.writable, false, 'fast path never writable');
  await n.close();
  t.equal(sha256(fs.readFileSync(copy)), sha256(fs.readFileSync(SAMPLE)), 'file unchanged');
});

t.test('hostile images give one-line image errors', async (t) => {
  const dir = tmpdir(t);
  const good = fs.readFileSync(SAMPLE);
  const headerSize = good.readUInt32LE(68);
  const catalog = good.readUInt32LE(72);
  const firstAllocated = (() => { for (let i = 0; i < catalog; i++) if (good.readUInt32LE(headerSize + 4 * i) !== 0xffffffff) return i; return -1; })();
  t.ok(firstAllocated >= 0);
  let i = 0;
  const check = async (what: string, edit: (f: string) => void, re: RegExp, base: Buffer = good): Promise<void> => {
    const f = path.join(dir, `h${i++}.img`);
    fs.writeFileSync(f, base);
    edit(f);
    const e = await openAndRead(f, 'bochs');
    t.ok(e instanceof ImgError, `${what}: ImgError (${String(e)})`);
    if (e instanceof ImgError) {
      t.equal(e.kind, 'image', `${what}: kind`);
      t.notOk(e.message.includes('\n'), `${what}: one line`);
      t.match(e.message, re, `${what}: message`);
    }
  };
  await check('bad magic', (f) => patch(f, 0, Buffer.from('Bochs Virtual XX')), /magic/);
  await check('not growing', (f) => patch(f, 48, Buffer.from('Undoable\0')), /Redolog\/Growing/);
  await check('bad version', (f) => patch(f, 64, le32(0x30000)), /version/);
  await check('too short', () => undefined, /too short/, good.subarray(0, 300));
  await check('catalog too large', (f) => patch(f, 72, le32(0x100001)), /too large/);
  await check('catalog too small', (f) => patch(f, 72, le32(2)), /too small/);
  await check('extent not a power of two', (f) => patch(f, 80, le32(3 << 12)), /power of two/);
  await check('extent too small', (f) => patch(f, 80, le32(256)), /at least 512/);
  await check('extent too large', (f) => patch(f, 80, le32(16 << 20)), /too large/);
  await check('header size beyond file', (f) => patch(f, 68, le32(0x7fffffff)), /header size/);
  await check('catalog beyond file', () => undefined, /beyond the end/, good.subarray(0, headerSize + 4 * catalog - 8));
  await check('extent beyond file', (f) => patch(f, headerSize + 4 * firstAllocated, le32(0x00ffffff)), /beyond the end/);
  await check('shared extents', (f) => patch(f, headerSize + 4 * (firstAllocated + 1), good.subarray(headerSize + 4 * firstAllocated, headerSize + 4 * firstAllocated + 4)), /share/);
  await check('bitmap too small', (f) => patch(f, 76, le32(1)), /bitmap/);
});

t.test('read() honours the sector bitmap even without blockStatus', async (t) => {
  const dir = tmpdir(t);
  const f = path.join(dir, 'stale.img');
  const b = Buffer.from(fs.readFileSync(SAMPLE));
  // put stale bytes into a sector of an allocated extent whose bitmap bit is clear
  const hs = b.readUInt32LE(68), cat = b.readUInt32LE(72), bm = b.readUInt32LE(76), es = b.readUInt32LE(80);
  const bmBlocks = 1 + Math.floor((bm - 1) / 512), exBlocks = 1 + Math.floor((es - 1) / 512);
  let stale = -1;
  for (let i = 0; i < cat && stale < 0; i++) {
    const v = b.readUInt32LE(hs + 4 * i);
    if (v === 0xffffffff) continue;
    const base = hs + 4 * cat + 512 * v * (bmBlocks + exBlocks);
    for (let s = 0; s < es / 512; s++) {
      if (!((b[base + (s >> 3)] >> (s & 7)) & 1)) { stale = base + 512 * bmBlocks + 512 * s; break; }
    }
  }
  t.ok(stale > 0, 'found a clear bit in an allocated extent');
  b.fill(0xaa, stale, stale + 512);
  fs.writeFileSync(f, b);
  const n = await openImage(f, { readOnly: true, format: 'bochs' });
  const whole = Buffer.alloc(n.size);
  await n.read(whole, 0);
  await n.close();
  t.equal(sha256(whole), SAMPLE_SHA, 'stale sector reads as zeros');
  t.ok(whole.equals(qemuRaw(dir, f, 'bochs')), 'as qemu reads it');
});
