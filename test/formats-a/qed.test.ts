import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { openImage } from '../../lib/core/graph';
import { readAt, writeAt, writeZeroesAt } from '../../lib/core/io';
import {
  assertContents, errKind, cli, firstDiff, infoBoth, infoHumanBoth, mapBoth, ourCreate, ourView, patch, qemuCheck, qemuImg, qemuImgStatus, qemuRaw,
  qemuWrite, randomWrites, scatteredWrites, tmpdir, u32le, u64le,
} from './helpers';

const FMT = 'qed';

t.test('qemu-written images read identically; info and map match qemu-img', async (t) => {
  const dir = tmpdir(t);
  for (const [opts, size] of [['cluster_size=4k,table_size=2', 3 << 20], ['', 5 << 20], ['cluster_size=64k,table_size=16', 2 << 20]] as const) {
    const img = path.join(dir, `a${opts.length}.qed`);
    qemuImg('create', '-q', '-f', FMT, ...(opts ? ['-o', opts] : []), img, String(size));
    const ref = Buffer.alloc(size);
    qemuWrite(img, FMT, scatteredWrites(size), ref);
    qemuImg('check', img);
    t.equal(firstDiff(qemuRaw(dir, img), ref), -1, `${opts}: qemu agrees with the reference`);
    t.equal(firstDiff(await ourView(img), ref), -1, `${opts}: we read what qemu wrote`);
    const i = await infoBoth(img, FMT);
    t.equal(i[0], i[1], `${opts}: info --output json equals qemu-img's`);
    const h = await infoHumanBoth(img, FMT);
    t.equal(h[0], h[1], 'human info equals qemu-img\'s');
    const m = await mapBoth(img, FMT);
    t.equal(m[0], m[1], `${opts}: map --output json equals qemu-img's`);
  }
});

t.test('zero clusters and a backing file (raw, not probed; qed, probed)', async (t) => {
  const dir = tmpdir(t);
  const base = path.join(dir, 'base.raw');
  const baseBuf = Buffer.alloc(1 << 20, 0x11);
  fs.writeFileSync(base, baseBuf);
  const img = path.join(dir, 'top.qed');
  qemuImg('create', '-q', '-f', FMT, '-b', 'base.raw', '-F', 'raw', '-o', 'cluster_size=4k', img);
  const ref = Buffer.from(baseBuf);
  qemuWrite(img, FMT, ['write -P 0x22 5000 9000'], ref);
  qemuImg('create', '-q', '-f', FMT, path.join(dir, 'unused.qed'), '1M');
  // write -z on a cluster over the backing file makes a zero cluster
  const { qemuIo } = await import('./helpers');
  qemuIo(img, ['write -z 65536 8192'], ['-f', FMT]);
  ref.fill(0, 65536, 65536 + 8192);
  t.equal(firstDiff(await ourView(img), ref), -1, 'backing, data and zero clusters read as qemu wrote them');
  const i = await infoBoth(img, FMT);
  t.equal(i[0], i[1], 'info with a backing file equals qemu-img');
  const m = await mapBoth(img, FMT);
  t.equal(m[0], m[1], 'map with zero clusters and backing equals qemu-img');
  // our writes over the backing file copy the rest of each cluster from it
  await randomWrites(img, FMT, ref, 7, 15, 20000);
  t.equal(qemuCheck(img).code, 0, 'qemu-img check clean after our writes');
  await assertContents(t, dir, img, FMT, ref, 'over backing');
  // our zero writes: whole clusters become zero clusters, partial ones are written
  const n = await openImage(img, {});
  await writeZeroesAt(n, 4096 * 3 + 100, 4096 * 4);
  await n.close();
  ref.fill(0, 4096 * 3 + 100, 4096 * 7 + 100);
  t.equal(qemuCheck(img).code, 0, 'qemu-img check clean after write zeroes');
  await assertContents(t, dir, img, FMT, ref, 'after write zeroes');
  // qed backing image (probed)
  const top2 = path.join(dir, 'top2.qed');
  await ourCreate(top2, FMT, null, { cluster_size: '4096' }, 'top.qed', 'qed');
  t.equal(qemuImg('info', '--output', 'json', top2).includes('"backing-filename": "top.qed"'), true, 'qemu sees our backing name');
  t.equal(firstDiff(qemuRaw(dir, top2), ref), -1, 'qemu reads our overlay through its backing');
  t.equal(firstDiff(await ourView(top2), ref), -1, 'we read our overlay through its backing');
  // commit into the backing file, then the overlay is emptied
  const ref2 = Buffer.from(ref);
  await randomWrites(top2, FMT, ref2, 21, 10, 9000);
  const cm = await cli(['commit', top2]);
  t.equal(cm.code, 0, `commit: ${cm.stderr}`);
  t.equal(qemuCheck(img).code, 0, 'the committed-to image passes qemu-img check');
  t.equal(qemuCheck(top2).code, 0, 'the emptied overlay passes qemu-img check');
  await assertContents(t, dir, img, FMT, ref2, 'the backing file after commit');
  await assertContents(t, dir, top2, FMT, ref2, 'the emptied overlay');
  t.equal(qemuImg('map', '--output', 'json', top2).includes('"depth": 0'), false, 'nothing left in the overlay');
});

t.test('setBacking rewrites the backing name and format as qemu-img rebase -u', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 's.qed');
  fs.writeFileSync(path.join(dir, 'b1.raw'), Buffer.alloc(1 << 20, 1));
  fs.writeFileSync(path.join(dir, 'b2.raw'), Buffer.alloc(1 << 20, 2));
  qemuImg('create', '-q', '-f', FMT, '-b', 'b1.raw', '-F', 'raw', img);
  const n = await openImage(img, {});
  await n.setBacking!('b2.raw', 'raw');
  await n.close();
  const info = JSON.parse(qemuImg('info', '--output', 'json', img));
  t.equal(info['backing-filename'], 'b2.raw', 'qemu sees the new name');
  t.equal(info['backing-filename-format'], 'raw', 'and the raw (no probe) format');
  t.equal(qemuCheck(img).code, 0, 'qemu-img check clean');
  t.equal((await ourView(img)).every((x) => x === 2), true, 'reads come from the new backing file');
  const n2 = await openImage(img, {});
  await n2.setBacking!(null, null);
  await n2.close();
  t.equal(JSON.parse(qemuImg('info', '--output', 'json', img))['backing-filename'], undefined, 'backing removed');
});

t.test('random unaligned writes pass qemu-img check and compare', async (t) => {
  const dir = tmpdir(t);
  for (const opts of ['cluster_size=4k,table_size=1', 'cluster_size=4k,table_size=2', 'cluster_size=16k']) {
    if (opts.includes('table_size=1')) continue; // qemu cannot open table_size=1 images (its table offset check)
    const size = 6 << 20;
    const img = path.join(dir, `w-${opts}.qed`);
    qemuImg('create', '-q', '-f', FMT, '-o', opts, img, String(size));
    const ref = Buffer.alloc(size);
    qemuWrite(img, FMT, ['write -P 0x5a 100000 300000'], ref);
    await randomWrites(img, FMT, ref, opts.length);
    const c = qemuCheck(img);
    t.equal(c.code, 0, `${opts}: qemu-img check: ${c.out}`);
    await assertContents(t, dir, img, FMT, ref, opts);
  }
});

t.test('images we create', async (t) => {
  const dir = tmpdir(t);
  const ours = path.join(dir, 'ours.qed');
  const theirs = path.join(dir, 'theirs.qed');
  await ourCreate(ours, FMT, 7 << 20, { cluster_size: '8192', table_size: '8' });
  qemuImg('create', '-q', '-f', FMT, '-o', 'cluster_size=8k,table_size=8', theirs, String(7 << 20));
  t.equal(Buffer.compare(fs.readFileSync(ours), fs.readFileSync(theirs)), 0, 'byte-identical to qemu-img create');
  t.equal(qemuCheck(ours).code, 0, 'qemu-img check passes');
  const ref = Buffer.alloc(7 << 20);
  await randomWrites(ours, FMT, ref, 3);
  t.equal(qemuCheck(ours).code, 0, 'qemu-img check passes after our writes');
  await assertContents(t, dir, ours, FMT, ref, 'our image');
  // options qemu refuses
  for (const [o, size] of [[{ cluster_size: '2048' }, 1 << 20], [{ table_size: '3' }, 1 << 20], [{ table_size: '32' }, 1 << 20],
    [{ cluster_size: '4096', table_size: '1' }, 2 ** 40]] as const) {
    t.equal(await errKind(ourCreate(path.join(dir, 'bad.qed'), FMT, size, { ...o })), 'usage', `refused: ${JSON.stringify(o)} size ${size}`);
  }
  t.equal(await errKind(ourCreate(path.join(dir, 'bad.qed'), FMT, 1 << 20, { bogus: '1' })), 'usage', 'unknown option refused');
});

t.test('convert in and out', async (t) => {
  const dir = tmpdir(t);
  const src = path.join(dir, 'src.raw');
  const ref = Buffer.alloc(3 << 20);
  ref.fill(0x42, 70000, 900000);
  ref.fill(0x43, 2 << 20, (2 << 20) + 12345);
  fs.writeFileSync(src, ref);
  const q = path.join(dir, 'c.qed');
  const r1 = (await cli(['convert', '-O', FMT, '-o', 'cluster_size=4k', src, q]));
  t.equal(r1.code, 0, `convert raw -> qed: ${r1.stderr}`);
  t.equal(qemuCheck(q).code, 0, 'qemu-img check passes');
  await assertContents(t, dir, q, FMT, ref, 'converted');
  const back = path.join(dir, 'back.raw');
  const r2 = (await cli(['convert', '-O', 'raw', q, back]));
  t.equal(r2.code, 0, `convert qed -> raw: ${r2.stderr}`);
  t.equal(firstDiff(fs.readFileSync(back), ref), -1, 'round trip');
});

t.test('the need-check bit: set while allocating, cleared on close, check run on read-write open', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'n.qed');
  qemuImg('create', '-q', '-f', FMT, '-o', 'cluster_size=4k', img, '1M');
  const features = (): number => Number(fs.readFileSync(img).readBigUInt64LE(16));
  const n = await openImage(img, {});
  await writeAt(n, Buffer.alloc(100, 1), 5000);
  t.equal(features() & 2, 2, 'need-check is set after an allocating write');
  await n.close();
  t.equal(features() & 2, 0, 'need-check is cleared on close');
  // a crashed writer: need-check set and an L2 entry pointing past the end of the file
  const buf = fs.readFileSync(img);
  const l1 = Number(buf.readBigUInt64LE(40));
  const l2 = Number(buf.readBigUInt64LE(l1));
  patch(img, l2 + 8 * 100, u64le(BigInt(buf.length + 4096 * 10)));
  patch(img, 16, u64le(2n));
  t.not(qemuCheck(img).code, 0, 'qemu-img check sees the corruption');
  t.equal(await errKind(ourView(img)), 'image', 'a read-only open does not repair; reading the bad cluster is an image error');
  const rw = await openImage(img, {});
  const b = Buffer.alloc(100);
  await readAt(rw, b, 5000);
  t.equal(b.every((x) => x === 1), true, 'data survives the repair');
  await rw.close();
  t.equal(features() & 2, 0, 'need-check cleared by the repair');
  t.equal(qemuCheck(img).code, 0, 'qemu-img check is clean after our repair');
});

t.test('check: exit codes and json as qemu-img', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'c.qed');
  qemuImg('create', '-q', '-f', FMT, '-o', 'cluster_size=4k', img, '2M');
  qemuWrite(img, FMT, ['write -P 0x5a 0 20000', 'write -P 0x5b 1000000 9000'], Buffer.alloc(2 << 20));
  const same = async (): Promise<void> => {
    const q = qemuImg('check', '--output', 'json', img);
    const o = (await cli(['check', '--output', 'json', img]));
    t.same(JSON.parse(o.stdout), JSON.parse(q), 'check json equals qemu-img');
  };
  await same();
  // a leaked cluster at the end of the file
  fs.appendFileSync(img, Buffer.alloc(4096, 7));
  t.equal(qemuCheck(img).code, 3, 'qemu: leaks exit 3');
  t.equal((await cli(['check', img])).code, 3, 'ours: leaks exit 3');
  // a cluster offset that is not aligned
  const buf = fs.readFileSync(img);
  const l2 = Number(buf.readBigUInt64LE(Number(buf.readBigUInt64LE(40))));
  patch(img, l2 + 8, u64le(BigInt(l2 + 100)));
  t.equal(qemuCheck(img).code, 2, 'qemu: corruption exit 2');
  t.equal((await cli(['check', img])).code, 2, 'ours: corruption exit 2');
  const qj = qemuImgStatus('check', '--output', 'json', img);
  const oj = await cli(['check', '--output', 'json', img]);
  t.same(JSON.parse(oj.stdout), JSON.parse(qj.out), 'check json of a corrupt image equals qemu-img');
  const rep = (await cli(['check', '-r', 'all', img]));
  t.equal(rep.code, 3, `repair leaves only the leaks (as qemu, which cannot free clusters): ${rep.stdout}${rep.stderr}`);
});

t.test('hostile headers give image errors', async (t) => {
  const dir = tmpdir(t);
  const good = path.join(dir, 'good.qed');
  qemuImg('create', '-q', '-f', FMT, '-o', 'cluster_size=4k', good, '4M');
  qemuWrite(good, FMT, ['write -P 0x5a 0 8192'], Buffer.alloc(4 << 20));
  const cases: Array<[string, number, Buffer]> = [
    ['cluster size not a power of two', 4, u32le(4097)],
    ['cluster size too large', 4, u32le(128 << 20)],
    ['cluster size too small', 4, u32le(512)],
    ['table size 32', 8, u32le(32)],
    ['header size huge', 12, u32le(0xffffffff)],
    ['unknown feature', 16, u64le(0x100n)],
    ['L1 offset past EOF', 40, u64le(1n << 40n)],
    ['L1 offset unaligned', 40, u64le(4097n)],
    ['image size beyond the tables', 48, u64le(1n << 60n)],
    ['image size not a sector multiple', 48, u64le(1000n)],
    ['backing name outside the header', 16, Buffer.concat([u64le(1n), Buffer.alloc(32), u32le(4000), u32le(2000)])],
  ];
  for (const [name, at, bytes] of cases) {
    const img = path.join(dir, 'h.qed');
    fs.copyFileSync(good, img);
    if (name.startsWith('backing')) {
      patch(img, 16, u64le(1n));
      patch(img, 56, Buffer.concat([u32le(4000), u32le(2000)]));
    } else patch(img, at, bytes);
    t.equal(await errKind(ourView(img)), 'image', name);
    t.equal((await cli(['info', img])).code, 2, `${name}: info exits 2`);
  }
  // an L2 entry past EOF: reading that cluster is an image error, the rest reads
  const img = path.join(dir, 'l2.qed');
  fs.copyFileSync(good, img);
  const buf = fs.readFileSync(img);
  const l2 = Number(buf.readBigUInt64LE(Number(buf.readBigUInt64LE(40))));
  patch(img, l2, u64le(1n << 50n));
  t.equal(await errKind(ourView(img)), 'image', 'data cluster past EOF');
  const trunc = path.join(dir, 'trunc.qed');
  fs.writeFileSync(trunc, fs.readFileSync(good).subarray(0, 40));
  t.equal(await errKind(ourView(trunc, { format: FMT })), 'image', 'truncated header');
});
