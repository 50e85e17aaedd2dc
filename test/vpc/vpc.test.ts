// vpc (VHD) against qemu-img / qemu-io 7.2: reads, writes, create, convert, size rules, hostile images.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { openImage } from '../../lib/core/graph';
import { readAt, writeAt } from '../../lib/core/io';
import { createImage } from '../../lib/ops/create';
import { convertImage } from '../../lib/ops/convert';
import { mapImage } from '../../lib/ops/map';
import { checkImage } from '../../lib/ops/check';
import { vpcChecksum, probeTail, calculateGeometry } from '../../lib/formats/vpc';
import { errKind, errMessage, firstDiff, ourView, qemuImg, qemuImgStatus, qemuIo, qemuRaw, readAll, tmpdir } from '../qcow2/helpers';

const PATTERNS = ['write -P 0x11 0 4k', 'write -P 0x22 1000k 300k', 'write -P 0x33 3M 64k', 'write -P 0x44 5000k 1k',
  'write -P 0x55 9M 512'];

function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return x / 4294967296; };
}

for (const sub of ['dynamic', 'fixed'] as const) {
  t.test(`${sub}: qemu-made image reads as qemu reads it; map agrees`, async (t) => {
    const dir = tmpdir(t);
    const img = path.join(dir, 'a.vpc');
    qemuImg('create', '-q', '-f', 'vpc', '-o', `subformat=${sub}`, img, '10M');
    qemuIo(img, PATTERNS, ['-f', 'vpc']);
    const ref = qemuRaw(dir, img, ['-f', 'vpc']);
    const ours = await ourView(img, { format: 'vpc' });
    t.equal(ours.length, ref.length, 'virtual size');
    t.equal(firstDiff(ours, ref), -1, 'contents');
    if (sub === 'dynamic') {
      const q = JSON.parse(qemuImg('map', '--output', 'json', '-f', 'vpc', img));
      const m = await mapImage(img, { format: 'vpc' });
      t.same(m.map((e) => [e.start, e.length, e.data, e.zero, e.offset]), q.map((e: Record<string, unknown>) => [e.start, e.length, e.data, e.zero, e.offset]));
      const info = JSON.parse(qemuImg('info', '--output', 'json', img));
      t.equal(info['cluster-size'], 2097152);
    }
  });

  t.test(`${sub}: random unaligned writes, then qemu compares equal`, async (t) => {
    const dir = tmpdir(t);
    const img = path.join(dir, 'w.vpc');
    qemuImg('create', '-q', '-f', 'vpc', '-o', `subformat=${sub}`, img, '9M');
    qemuIo(img, ['write -P 0x5a 2M 100k'], ['-f', 'vpc']);
    const ref = qemuRaw(dir, img, ['-f', 'vpc']);
    const node = await openImage(img, { format: 'vpc' });
    const r = rng(sub === 'fixed' ? 7 : 3);
    for (let i = 0; i < 40; i++) {
      const len = 1 + Math.floor(r() * 70000);
      const off = Math.floor(r() * (node.size - len));
      const b = Buffer.alloc(len);
      for (let j = 0; j < len; j++) b[j] = (i * 31 + j) & 0xff;
      await writeAt(node, b, off);
      b.copy(ref, off);
    }
    const back = await readAll(node);
    t.equal(firstDiff(back, ref), -1, 'our read-back');
    await node.close();
    const refFile = path.join(dir, 'ref.raw');
    fs.writeFileSync(refFile, ref);
    const c = qemuImgStatus('compare', '-f', 'vpc', '-F', 'raw', img, refFile);
    t.equal(c.code, 0, `qemu-img compare: ${c.out}${c.err}`);
    if (sub === 'dynamic') {
      // the footer copy at the end is intact and the file ends with it
      const buf = fs.readFileSync(img);
      t.equal(buf.toString('latin1', buf.length - 512, buf.length - 504), 'conectix', 'footer at the end');
      t.same(buf.subarray(buf.length - 512), buf.subarray(0, 512), 'footer equals its copy at 0');
    }
  });

  t.test(`${sub}: images we create are read by qemu`, async (t) => {
    const dir = tmpdir(t);
    for (const [size, force] of [[10 * 1024 * 1024, false], [50 * 1024 * 1024 + 12345 * 512, false], [10 * 1024 * 1024, true]] as const) {
      const ours = path.join(dir, `o-${size}-${force}.vpc`);
      const theirs = path.join(dir, `q-${size}-${force}.vpc`);
      const opts = `subformat=${sub},force_size=${force ? 'on' : 'off'}`;
      await createImage({ format: 'vpc', filename: ours, size, options: { subformat: sub, force_size: force ? 'on' : 'off' } });
      qemuImg('create', '-q', '-f', 'vpc', '-o', opts, theirs, String(size));
      const qi = JSON.parse(qemuImg('info', '--output', 'json', '-f', 'vpc', theirs));
      const oi = JSON.parse(qemuImg('info', '--output', 'json', '-f', 'vpc', ours));
      t.equal(oi['virtual-size'], qi['virtual-size'], `virtual size ${opts} ${size}`);
      t.equal(fs.statSync(ours).size, fs.statSync(theirs).size, 'file size');
      const a = fs.readFileSync(ours); const b = fs.readFileSync(theirs);
      // footer fields up to the timestamp, and creator app / sizes / geometry / type
      const foot = (x: Buffer) => (sub === 'fixed' ? x.subarray(x.length - 512) : x.subarray(0, 512));
      t.same(foot(a).subarray(0, 24), foot(b).subarray(0, 24), 'footer head');
      t.same(foot(a).subarray(28, 64), foot(b).subarray(28, 64), 'creator, sizes, geometry, type');
      if (sub === 'dynamic') t.same(a.subarray(512, 1536), b.subarray(512, 1536), 'dynamic header');
      qemuIo(ours, ['write -P 0x77 1M 70k'], ['-f', 'vpc']);
      const n = await openImage(ours, { format: 'vpc', readOnly: true });
      const got = Buffer.alloc(70 * 1024);
      await readAt(n, got, 1024 * 1024);
      await n.close();
      t.ok(got.every((x) => x === 0x77), 'qemu writes into our image read back');
      t.equal(qemuImgStatus('compare', '-f', 'vpc', '-F', 'vpc', ours, ours).code, 0);
    }
  });
}

t.test('a block whose sector bitmap is partial (other VHD writers): read as qemu, bitmap filled on write', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'b.vpc');
  qemuImg('create', '-q', '-f', 'vpc', img, '6M');
  qemuIo(img, ['write -P 0x31 0 1M'], ['-f', 'vpc']);
  const buf = fs.readFileSync(img);
  const blk = buf.readUInt32BE(1536) * 512;
  buf.fill(0, blk, blk + 512); // bitmap: no sector marked present
  buf.fill(0x0f, blk, blk + 16);
  fs.writeFileSync(img, buf);
  const ref = qemuRaw(dir, img, ['-f', 'vpc']);
  t.equal(firstDiff(await ourView(img, { format: 'vpc' }), ref), -1, 'read as qemu reads (bitmap ignored)');
  const n = await openImage(img, { format: 'vpc' });
  const st = await n.blockStatus(0, 4096);
  t.equal(st.state, 'data');
  t.equal(st.host?.writable, false, 'fast-path overwrite not allowed while the bitmap is partial');
  await writeAt(n, Buffer.alloc(100, 0x99), 5000);
  t.equal((await n.blockStatus(0, 4096)).host?.writable, true, 'writable once the bitmap is full');
  await n.close();
  const after = fs.readFileSync(img);
  t.ok(after.subarray(blk, blk + 512).every((x) => x === 0xff), 'bitmap marks every sector present');
  ref.fill(0x99, 5000, 5100);
  t.equal(firstDiff(qemuRaw(dir, img, ['-f', 'vpc']), ref), -1, 'qemu reads the result');
});

t.test('convert both ways', async (t) => {
  const dir = tmpdir(t);
  const raw = path.join(dir, 'src.raw');
  const b = Buffer.alloc(6 * 1024 * 1024);
  for (let i = 0; i < b.length; i += 4096) if ((i >> 12) % 5 === 1) b.fill((i >> 12) & 0xff, i, i + 4096);
  fs.writeFileSync(raw, b);
  for (const sub of ['dynamic', 'fixed']) {
    const v = path.join(dir, `c-${sub}.vpc`);
    await convertImage({ src: raw, srcOpen: { format: 'raw' }, dst: v, outFormat: 'vpc', outOptions: { subformat: sub } });
    const out = qemuRaw(dir, v, ['-f', 'vpc']);
    t.equal(firstDiff(out.subarray(0, b.length), b), -1, `${sub}: qemu reads our convert`);
    t.ok(out.subarray(b.length).every((x) => x === 0), 'rounded-up tail is zero');
    const q = path.join(dir, `q-${sub}.vpc`);
    qemuImg('convert', '-f', 'raw', '-O', 'vpc', '-o', `subformat=${sub}`, raw, q);
    const back = path.join(dir, `back-${sub}.raw`);
    await convertImage({ src: q, srcOpen: { format: 'vpc' }, dst: back, outFormat: 'raw' });
    t.equal(firstDiff(fs.readFileSync(back).subarray(0, b.length), b), -1, `${sub}: we read qemu's convert`);
  }
});

function setFooter(buf: Buffer, at: number, edit: (f: Buffer) => void): void {
  const f = buf.subarray(at, at + 512);
  edit(f);
  f.writeUInt32BE(vpcChecksum(f), 64);
}

t.test('size rules: creator app decides between CHS and current_size', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'h.vpc');
  qemuImg('create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', img, '10M');
  const buf = fs.readFileSync(img);
  const end = buf.length - 512;
  const chs = buf.readUInt16BE(end + 56) * buf[end + 58] * buf[end + 59] * 512;
  for (const [app, want] of [['win ', 8 * 1024 * 1024], ['d2v ', 8 * 1024 * 1024], ['qem2', 8 * 1024 * 1024],
    ['vpc ', chs], ['qemu', chs], ['CTXS', 8 * 1024 * 1024]] as const) {
    setFooter(buf, end, (f) => { f.write(app, 28, 'latin1'); f.writeBigUInt64BE(BigInt(8 * 1024 * 1024), 48); });
    fs.writeFileSync(img, buf);
    const n = await openImage(img, { format: 'vpc', readOnly: true });
    t.equal(n.size, want, `creator '${app}'`);
    await n.close();
    t.equal(JSON.parse(qemuImg('info', '--output', 'json', '-f', 'vpc', img))['virtual-size'], want, `qemu agrees for '${app}'`);
  }
  const n = await openImage(img, { format: 'vpc', readOnly: true, options: { force_size_calc: 'chs' } });
  t.equal(n.size, chs, 'force_size_calc=chs');
  await n.close();
  t.same(calculateGeometry(20480), { cyls: 301, heads: 4, secs: 17 });
});

t.test('fixed VHD recognised from its tail; probe by head for dynamic', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'f.vpc');
  qemuImg('create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', img, '3M');
  const buf = fs.readFileSync(img);
  t.equal(probeTail(buf.subarray(buf.length - 65536), buf.length), 100);
  buf[buf.length - 1] ^= 1;
  t.equal(probeTail(buf.subarray(buf.length - 65536), buf.length), 0, 'bad checksum: not a VHD');
  const d = path.join(dir, 'd.vpc');
  qemuImg('create', '-q', '-f', 'vpc', d, '3M');
  const n = await openImage(d, { readOnly: true });
  t.equal(n.driver, 'vpc');
  await n.close();
  const rep = await checkImage(d, {}, 'none');
  t.equal(rep.result, null, 'vpc has no check');
});

t.test('hostile images give kind image', async (t) => {
  const dir = tmpdir(t);
  const base = path.join(dir, 'base.vpc');
  qemuImg('create', '-q', '-f', 'vpc', base, '10M');
  qemuIo(base, ['write -P 1 0 4k'], ['-f', 'vpc']);
  const good = fs.readFileSync(base);
  const cases: Record<string, (b: Buffer) => Buffer> = {
    'bad footer checksum': (b) => { b[70] ^= 0xff; return b; },
    'block size 0': (b) => { b.writeUInt32BE(0, 512 + 32); return b; },
    'block size not a power of two': (b) => { b.writeUInt32BE(3 * 65536, 512 + 32); return b; },
    'BAT too small': (b) => { b.writeUInt32BE(1, 512 + 28); return b; },
    'huge BAT': (b) => { b.writeUInt32BE(0xfffffff0, 512 + 28); b.writeUInt32BE(512, 512 + 32); return b; },
    'BAT beyond EOF': (b) => { b.writeBigUInt64BE(1n << 40n, 512 + 16); return b; },
    'block beyond EOF': (b) => { b.writeUInt32BE(0x7ffffff0, 1536); return b; },
    'block over the BAT': (b) => { b.writeUInt32BE(3, 1536); return b; },
    'dynamic header beyond EOF': (b) => { setFooter(b, 0, (f) => f.writeBigUInt64BE(1n << 50n, 16)); return b; },
    'no cxsparse': (b) => { b.write('xxxxxxxx', 512, 'latin1'); return b; },
    'size too large': (b) => { setFooter(b, 0, (f) => { f.write('win ', 28, 'latin1'); f.writeBigUInt64BE(1n << 52n, 48); }); return b; },
    truncated: (b) => b.subarray(0, 1500),
    tiny: (b) => b.subarray(0, 100),
  };
  for (const [name, mut] of Object.entries(cases)) {
    const f = path.join(dir, `${name.replace(/ /g, '_')}.vpc`);
    fs.writeFileSync(f, mut(Buffer.from(good)));
    const kind = await errKind(openImage(f, { format: 'vpc', readOnly: true }).then((n) => n.close()));
    t.equal(kind, 'image', `${name}: ${await errMessage(openImage(f, { format: 'vpc', readOnly: true }).then((n) => n.close()))}`);
  }
  const diff = path.join(dir, 'diff.vpc');
  const b = Buffer.from(good);
  setFooter(b, 0, (f) => f.writeUInt32BE(4, 60));
  fs.writeFileSync(diff, b);
  t.equal(await errKind(openImage(diff, { format: 'vpc', readOnly: true })), 'unsupported', 'differencing refused');
  const fixedTrunc = path.join(dir, 'ft.vpc');
  qemuImg('create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', fixedTrunc, '4M');
  const fb = fs.readFileSync(fixedTrunc);
  fs.writeFileSync(fixedTrunc, Buffer.concat([fb.subarray(0, 1024 * 1024), fb.subarray(fb.length - 512)]));
  t.equal(await errKind(openImage(fixedTrunc, { format: 'vpc', readOnly: true })), 'image', 'fixed image shorter than its size');
});

t.test('concurrent writes to distinct ranges (allocations race)', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'c.vpc');
  qemuImg('create', '-q', '-f', 'vpc', img, '16M');
  const node = await openImage(img, { format: 'vpc' });
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
  t.equal(firstDiff(qemuRaw(dir, img, ['-f', 'vpc']), ref), -1, 'qemu reads every write');
  const buf = fs.readFileSync(img);
  t.same(buf.subarray(buf.length - 512), buf.subarray(0, 512), 'footer at the end');
});
