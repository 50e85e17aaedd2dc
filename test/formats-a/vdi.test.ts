import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import {
  assertContents, cli, errKind, firstDiff, infoBoth, infoHumanBoth, mapBoth, ourCreate, ourView, patch, qemuCheck, qemuImg, qemuImgStatus, qemuRaw,
  qemuMadeMatches, qemuWrite, randomWrites, scatteredWrites, tmpdir, u32le, u64le,
} from './helpers';

const FMT = 'vdi';
const MiB = 1 << 20;

t.test('qemu-written dynamic and static images read identically; info and map match qemu-img', async (t) => {
  const dir = tmpdir(t);
  for (const opts of ['', 'static=on']) {
    const size = 5 * MiB + 3 * 512;
    const img = path.join(dir, `a${opts.length}.vdi`);
    await qemuMadeMatches(t, dir, img, FMT, opts, size, false);
    // static images: qemu's block status asks the host file for holes (BDRV_BLOCK_RECURSE) and
    // prints allocated-but-sparse ranges as "data": true, "zero": true, a state our extents
    // (data | zero | unallocated) do not have; compare the map of dynamic images only
    if (!opts) {
      const m = await mapBoth(img, FMT);
      t.equal(m[0], m[1], `${opts}: map --output json equals qemu-img's`);
    }
    const c = await cli(['check', '--output', 'json', img]);
    t.same(JSON.parse(c.stdout), JSON.parse(qemuImg('check', '--output', 'json', img)), `${opts}: check json equals qemu-img's`);
  }
});

t.test('random unaligned writes pass qemu-img check and compare', async (t) => {
  const dir = tmpdir(t);
  for (const opts of ['', 'static=on']) {
    const size = 6 * MiB;
    const img = path.join(dir, `w${opts.length}.vdi`);
    qemuImg('create', '-q', '-f', FMT, ...(opts ? ['-o', opts] : []), img, String(size));
    const ref = Buffer.alloc(size);
    qemuWrite(img, FMT, ['write -P 0x5a 100000 300000'], ref);
    await randomWrites(img, FMT, ref, 11 + opts.length);
    const c = qemuCheck(img);
    t.equal(c.code, 0, `${opts}: qemu-img check: ${c.out}`);
    await assertContents(t, dir, img, FMT, ref, opts || 'dynamic');
  }
});

t.test('images we create', async (t) => {
  const dir = tmpdir(t);
  const uuids = (b: Buffer): Buffer => { const c = Buffer.from(b); c.fill(0, 0x188, 0x1a8); return c; };
  for (const [opts, qopts] of [[{}, ''], [{ static: 'on' }, 'static=on'], [{ preallocation: 'full' }, 'preallocation=full']] as const) {
    const size = 3 * MiB + 512;
    const ours = path.join(dir, 'ours.vdi');
    const theirs = path.join(dir, 'theirs.vdi');
    await ourCreate(ours, FMT, size, { ...opts });
    qemuImg('create', '-q', '-f', FMT, ...(qopts ? ['-o', qopts] : []), theirs, String(size));
    t.equal(Buffer.compare(uuids(fs.readFileSync(ours)), uuids(fs.readFileSync(theirs))), 0,
      `${JSON.stringify(opts)}: byte-identical to qemu-img create but for the random UUIDs`);
    t.equal(qemuCheck(ours).code, 0, 'qemu-img check passes');
    const ref = Buffer.alloc(size);
    await randomWrites(ours, FMT, ref, 5, 10);
    t.equal(qemuCheck(ours).code, 0, 'qemu-img check passes after our writes');
    await assertContents(t, dir, ours, FMT, ref, `our ${JSON.stringify(opts)} image`);
  }
  t.equal(await errKind(ourCreate(path.join(dir, 'bad.vdi'), FMT, MiB, { cluster_size: '4096' })), 'usage', 'unknown option refused');
  t.equal(await errKind(ourCreate(path.join(dir, 'bad.vdi'), FMT, MiB, { preallocation: 'metadata' })), 'usage',
    'preallocation=metadata refused as by qemu-img');
});

t.test('convert in and out', async (t) => {
  const dir = tmpdir(t);
  const src = path.join(dir, 'src.raw');
  const ref = Buffer.alloc(3 * MiB);
  ref.fill(0x42, 70000, 900000);
  ref.fill(0x43, 2 * MiB + 5, 2 * MiB + 12345);
  fs.writeFileSync(src, ref);
  for (const o of ['static=off', 'static=on']) {
    const img = path.join(dir, 'c.vdi');
    const r1 = await cli(['convert', '-O', FMT, '-o', o, src, img]);
    t.equal(r1.code, 0, `convert raw -> vdi ${o}: ${r1.stderr}`);
    t.equal(qemuCheck(img).code, 0, 'qemu-img check passes');
    await assertContents(t, dir, img, FMT, ref, `converted ${o}`);
    const back = path.join(dir, 'back.raw');
    const r2 = await cli(['convert', '-O', 'raw', img, back]);
    t.equal(r2.code, 0, `convert vdi -> raw: ${r2.stderr}`);
    t.equal(firstDiff(fs.readFileSync(back), ref), -1, 'round trip');
    fs.unlinkSync(img);
  }
});

t.test('check finds what qemu-img check finds', async (t) => {
  const dir = tmpdir(t);
  const good = path.join(dir, 'good.vdi');
  qemuImg('create', '-q', '-f', FMT, good, '4M');
  qemuWrite(good, FMT, ['write -P 1 0 4096', 'write -P 2 2M 4096'], Buffer.alloc(4 * MiB));
  const cases: Array<[string, number, Buffer]> = [
    ['allocated count mismatch', 0x184, u32le(1)],
    ['two blocks share one data block', 0x200 + 8, u32le(0)],
    ['block index too large', 0x200 + 12, u32le(100)],
  ];
  for (const [name, at, bytes] of cases) {
    const img = path.join(dir, 'c.vdi');
    fs.copyFileSync(good, img);
    patch(img, at, bytes);
    const q = qemuCheck(img);
    const o = await cli(['check', img]);
    t.equal(q.code, 2, `${name}: qemu-img check exits 2`);
    t.equal(o.code, q.code, `${name}: ours exits as qemu`);
  }
  const q = qemuCheck(good);
  t.equal(q.code, 0, 'the good image is clean');
  t.equal((await cli(['check', '-r', 'all', good])).code, 63, 'qemu-img check -r exits 63 for vdi (no repair); so do we');
  t.equal(qemuImgStatus('check', '-r', 'all', good).code, 63, 'qemu: 63');
});

t.test('hostile headers give image errors', async (t) => {
  const dir = tmpdir(t);
  const good = path.join(dir, 'good.vdi');
  qemuImg('create', '-q', '-f', FMT, good, '4M');
  qemuWrite(good, FMT, ['write -P 0x5a 0 8192'], Buffer.alloc(4 * MiB));
  const cases: Array<[string, number, Buffer]> = [
    ['version 1.0', 0x44, u32le(0x00010000)],
    ['image type 3', 0x4c, u32le(3)],
    ['unaligned block map offset', 0x154, u32le(0x201)],
    ['block map offset past EOF', 0x154, u32le(0x7ffffe00)],
    ['unaligned data offset', 0x158, u32le(0x401)],
    ['sector size 4096', 0x168, u32le(4096)],
    ['disk size beyond the block map', 0x170, u64le(BigInt(100 * MiB))],
    ['disk size huge', 0x170, u64le(1n << 62n)],
    ['block size 4096', 0x178, u32le(4096)],
    ['blocks in image huge', 0x180, u32le(0x3fffffff)],
    ['blocks in image beyond the file', 0x180, u32le(1000000)],
    ['link UUID set', 0x1a8, Buffer.alloc(16, 1)],
    ['parent UUID set', 0x1b8, Buffer.alloc(16, 1)],
  ];
  for (const [name, at, bytes] of cases) {
    const img = path.join(dir, 'h.vdi');
    fs.copyFileSync(good, img);
    patch(img, at, bytes);
    t.equal(await errKind(ourView(img, { format: FMT })), 'image', name);
  }
  const img = path.join(dir, 'entry.vdi');
  fs.copyFileSync(good, img);
  patch(img, 0x200, u32le(7));
  t.equal(await errKind(ourView(img)), 'image', 'a block map entry beyond the image is an image error when read');
  t.equal((await cli(['info', img])).code, 0, 'but info still works');
  const trunc = path.join(dir, 'trunc.vdi');
  fs.writeFileSync(trunc, fs.readFileSync(good).subarray(0, 0x190));
  t.equal(await errKind(ourView(trunc, { format: FMT })), 'image', 'truncated header');
});
