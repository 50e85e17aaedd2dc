// vhdx against qemu-img / qemu-io 7.2: qemu-made images of every subformat read and written here.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { openImage } from '../../lib/core/graph';
import { writeAt } from '../../lib/core/io';
import { mapImage } from '../../lib/ops/map';
import { HEADER1, parseHeader } from '../../lib/formats/vhdx/format';
import { firstDiff, ourView, qemuImg, qemuImgStatus, qemuIo, qemuRaw, readAll, tmpdir } from '../qcow2/helpers';

const PATTERNS = ['write -P 0x11 0 4k', 'write -P 0x22 1000k 300k', 'write -P 0x33 3M 64k', 'write -P 0x44 5000k 1k',
  'write -P 0x55 9M 512', 'write -P 0x66 17M 2M'];

function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return x / 4294967296; };
}

const VARIANTS = [
  'subformat=dynamic',
  'subformat=dynamic,block_state_zero=off,block_size=1M',
  'subformat=fixed,block_size=2M,log_size=2M',
  'subformat=fixed,block_state_zero=off,block_size=1M',
];

for (const opts of VARIANTS) {
  t.test(`${opts}: qemu-made image reads as qemu reads it`, async (t) => {
    const dir = tmpdir(t);
    const img = path.join(dir, 'a.vhdx');
    qemuImg('create', '-q', '-f', 'vhdx', '-o', opts, img, '20M');
    qemuIo(img, PATTERNS, ['-f', 'vhdx']);
    const ref = qemuRaw(dir, img, ['-f', 'vhdx']);
    const ours = await ourView(img, { format: 'vhdx' });
    t.equal(ours.length, ref.length, 'virtual size');
    t.equal(firstDiff(ours, ref), -1, 'contents');
    const m = await mapImage(img, { format: 'vhdx' });
    t.ok(m.some((e) => e.data && e.offset !== undefined), 'map shows host offsets of data');
    t.equal(m.reduce((a, e) => a + e.length, 0), ref.length, 'map covers the disk');
    // the FUSE fast path serves these host ranges directly: they must hold the guest bytes
    const raw = fs.readFileSync(img);
    for (const e of m) {
      if (e.offset === undefined) continue;
      t.equal(firstDiff(raw.subarray(e.offset, e.offset + e.length), ref.subarray(e.start, e.start + e.length)), -1, `host range of ${e.start}+${e.length}`);
    }
    const info = JSON.parse(qemuImg('info', '--output', 'json', img));
    const n = await openImage(img, { readOnly: true });
    t.same(await n.infoExtra!(), { 'cluster-size': info['cluster-size'] }, 'cluster-size as qemu');
    await n.close();
  });

  t.test(`${opts}: random unaligned writes: qemu-img check clean, compare equal`, async (t) => {
    const dir = tmpdir(t);
    const img = path.join(dir, 'w.vhdx');
    qemuImg('create', '-q', '-f', 'vhdx', '-o', opts, img, '12M');
    qemuIo(img, ['write -P 0x5a 2M 100k'], ['-f', 'vhdx']);
    const ref = qemuRaw(dir, img, ['-f', 'vhdx']);
    const node = await openImage(img, { format: 'vhdx' });
    const r = rng(opts.length);
    for (let i = 0; i < 30; i++) {
      const len = 1 + Math.floor(r() * 90000);
      const off = Math.floor(r() * (node.size - len));
      const b = Buffer.alloc(len);
      for (let j = 0; j < len; j++) b[j] = (i * 7 + j) & 0xff;
      await writeAt(node, b, off);
      b.copy(ref, off);
    }
    t.equal(firstDiff(await readAll(node), ref), -1, 'our read-back');
    await node.close();
    const c = qemuImgStatus('check', '-f', 'vhdx', img);
    t.equal(c.code, 0, `qemu-img check: ${c.out}${c.err}`);
    const refFile = path.join(dir, 'ref.raw');
    fs.writeFileSync(refFile, ref);
    const cmp = qemuImgStatus('compare', '-f', 'vhdx', '-F', 'raw', img, refFile);
    t.equal(cmp.code, 0, `qemu-img compare: ${cmp.out}${cmp.err}`);
    const h1 = parseHeader(fs.readFileSync(img).subarray(HEADER1, HEADER1 + 4096));
    t.ok(h1 && h1.logGuid.every((x) => x === 0), 'log is empty after close');
  });
}


t.test('concurrent writes to distinct ranges (allocations race)', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'c.vhdx');
  qemuImg('create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', img, '16M');
  const node = await openImage(img, { format: 'vhdx' });
  const ref = Buffer.alloc(node.size);
  const jobs: Promise<void>[] = [];
  for (let i = 0; i < 64; i++) {
    const off = i * 256 * 1024 + 1000;
    const b = Buffer.alloc(100000, (i % 250) + 1);
    b.copy(ref, off);
    jobs.push(writeAt(node, b, off));
  }
  await Promise.all(jobs);
  await node.close();
  t.equal(qemuImgStatus('check', '-f', 'vhdx', img).code, 0, 'qemu-img check clean');
  t.equal(firstDiff(qemuRaw(dir, img, ['-f', 'vhdx']), ref), -1, 'qemu reads every write');
});
