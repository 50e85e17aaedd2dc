import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { openImage } from '../../lib/core/graph';
import { discardAt, writeAt, writeZeroesAt } from '../../lib/core/io';
import { firstDiff, ourView, qemuImg, qemuImgIn, qemuImgStatus, qemuIo, qemuRaw, tmpdir } from './helpers';

// deterministic pseudo-random numbers
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => { s = (s * 1664525 + 1013904223) >>> 0; return s / 2 ** 32; };
}

interface Variant { name: string; create: string[]; size: number; setup?: (dir: string, img: string) => void }

const variants: Variant[] = [
  { name: 'v3 64k', create: [], size: 4 << 20 },
  { name: 'v2 512', create: ['-o', 'compat=0.10,cluster_size=512'], size: 2 << 20 },
  { name: 'extended_l2 32k', create: ['-o', 'extended_l2=on,cluster_size=32k'], size: 3 << 20 },
  { name: 'refcount_bits=1 4k', create: ['-o', 'refcount_bits=1,cluster_size=4k'], size: 2 << 20 },
  { name: 'refcount_bits=64 1k', create: ['-o', 'refcount_bits=64,cluster_size=1k'], size: 2 << 20 },
  { name: 'refcount_bits=4 512 (refcount table growth)', create: ['-o', 'refcount_bits=4,cluster_size=512'], size: 24 << 20 },
  { name: 'lazy_refcounts', create: ['-o', 'lazy_refcounts=on'], size: 2 << 20 },
  { name: 'data_file', create: ['-o', 'data_file=DIR/data.raw'], size: 2 << 20 },
  { name: 'data_file_raw', create: ['-o', 'data_file=DIR/data.raw,data_file_raw=on'], size: 2 << 20 },
];

for (const v of variants) {
  t.test(`random writes: ${v.name}`, async (t) => {
    const dir = tmpdir(t);
    const img = path.join(dir, 'a.qcow2');
    qemuImgIn(dir, 'create', '-q', '-f', 'qcow2', ...v.create.map((a) => a.replace('DIR', dir)), img, String(v.size));
    qemuIo(img, ['write -P 0x5a 64k 200k', 'write -z 600k 64k']);
    const ref = qemuRaw(dir, img);
    const node = await openImage(img, {});
    const r = rng(v.size + v.name.length);
    const count = v.size > (8 << 20) ? 40 : 25;
    for (let i = 0; i < count; i++) {
      const len = 1 + Math.floor(r() * 150000);
      const off = Math.floor(r() * (v.size - len));
      const b = Buffer.alloc(len, (i * 37 + 1) & 0xff);
      for (let k = 0; k < len; k += 97) b[k] = Math.floor(r() * 256);
      await writeAt(node, b, off);
      b.copy(ref, off);
    }
    if (v.size > (8 << 20)) {
      // fill a large area to make the refcount table grow
      const b = Buffer.alloc(v.size - (12 << 20), 0x77);
      await writeAt(node, b, 12 << 20);
      b.copy(ref, 12 << 20);
    }
    await writeZeroesAt(node, 70000, 200000);
    ref.fill(0, 70000, 270000);
    await node.close();
    const chk = qemuImgStatus('check', img);
    t.equal(chk.code, 0, `qemu-img check clean: ${chk.out}${chk.err}`);
    const refFile = path.join(dir, 'ref.raw');
    fs.writeFileSync(refFile, ref);
    const cmp = qemuImgStatus('compare', '-f', 'qcow2', '-F', 'raw', img, refFile);
    t.equal(cmp.code, 0, `qemu-img compare: ${cmp.out}${cmp.err}`);
    t.equal(firstDiff(await ourView(img), ref), -1, 'our view equals the reference');
  });
}

t.test('writes over a backing chain, compressed and shared clusters', async (t) => {
  const dir = tmpdir(t);
  const base = path.join(dir, 'base.qcow2');
  const mid = path.join(dir, 'mid.qcow2');
  const top = path.join(dir, 'top.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', base, '2M');
  qemuIo(base, ['write -P 0x11 0 2M']);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', '-o', 'cluster_size=16k', mid);
  qemuIo(mid, ['write -P 0x22 100k 50k']);
  const comp = path.join(dir, 'comp.qcow2');
  qemuImg('convert', '-c', '-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', mid, comp);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'comp.qcow2', '-F', 'qcow2', top);
  qemuIo(top, ['write -P 0x33 300k 10k']);
  // the top layer's snapshot makes its clusters shared
  qemuImg('snapshot', '-c', 'snap', top);
  const ref = qemuRaw(dir, top);
  const node = await openImage(top, {});
  const w = async (off: number, len: number, val: number): Promise<void> => {
    const b = Buffer.alloc(len, val);
    await writeAt(node, b, off);
    b.copy(ref, off);
  };
  await w(305 * 1024 + 3, 1000, 0x44); // shared cluster: COW
  await w(1000, 5, 0x55); // backing shows through around it
  await discardAt(node, 1 << 20, 128 << 10);
  ref.fill(0, 1 << 20, (1 << 20) + (128 << 10));
  await node.close();
  const topNow = qemuRaw(dir, top);
  const d = firstDiff(topNow, ref);
  t.equal(d, -1, `top reads back as written (qemu) ${d >= 0 ? `${topNow[d]} != ${ref[d]}` : ''}`);
  const cref = qemuRaw(dir, comp);
  const compN = await openImage(comp, {});
  const b = Buffer.alloc(777, 0x66);
  await writeAt(compN, b, 120 * 1024 + 1); // inside a compressed cluster
  b.copy(cref, 120 * 1024 + 1);
  await compN.close();
  for (const f of [top, comp]) {
    const chk = qemuImgStatus('check', f);
    t.equal(chk.code, 0, `qemu-img check ${path.basename(f)}: ${chk.out}${chk.err}`);
  }
  t.equal(firstDiff(qemuRaw(dir, comp), cref), -1, 'compressed image reads back as written (qemu)');
  const snapRaw = path.join(dir, 'snap.raw');
  qemuImg('convert', '-l', 'snapshot.name=snap', '-O', 'raw', top, snapRaw);
  const snapNow = fs.readFileSync(snapRaw);
  t.equal(snapNow.readUInt8(305 * 1024 + 3), 0x33, 'snapshot keeps the old data after COW');
});
