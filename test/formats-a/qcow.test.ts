import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { openImage } from '../../lib/core/graph';
import { writeAt } from '../../lib/core/io';
import {
  assertContents, cli, errKind, firstDiff, infoBoth, infoHumanBoth, mapBoth, ourCreate, ourView, patch, qemuCheck, qemuImg, qemuIo, qemuRaw,
  qemuWrite, randomWrites, scatteredWrites, tmpdir, u32be, u64be,
} from './helpers';

const FMT = 'qcow';

t.test('qemu-written images read identically; info and map match qemu-img', async (t) => {
  const dir = tmpdir(t);
  const size = 5 * (1 << 20) + 1536;
  const img = path.join(dir, 'a.qcow');
  qemuImg('create', '-q', '-f', FMT, img, String(size));
  const ref = Buffer.alloc(size);
  qemuWrite(img, FMT, scatteredWrites(size), ref);
  t.equal(firstDiff(qemuRaw(dir, img), ref), -1, 'qemu agrees with the reference');
  t.equal(firstDiff(await ourView(img), ref), -1, 'we read what qemu wrote');
  const i = await infoBoth(img, FMT);
  t.equal(i[0], i[1], 'info --output json equals qemu-img\'s');
  const h = await infoHumanBoth(img, FMT);
  t.equal(h[0], h[1], 'human info equals qemu-img\'s');
  const m = await mapBoth(img, FMT);
  t.equal(m[0], m[1], 'map --output json equals qemu-img\'s');
  const c = await cli(['check', img]);
  t.equal(c.code, qemuCheck(img).code, 'check exits 63 as qemu-img (qcow has no check)');
  t.equal(c.code, 63, 'exit 63');
});

t.test('backing files and compressed clusters', async (t) => {
  const dir = tmpdir(t);
  const size = 3 << 20;
  const base = path.join(dir, 'base.qcow');
  qemuImg('create', '-q', '-f', FMT, base, String(size));
  const ref = Buffer.alloc(size);
  qemuWrite(base, FMT, ['write -P 0x11 0 3145728'], ref);
  const top = path.join(dir, 'top.qcow');
  qemuImg('create', '-q', '-f', FMT, '-b', 'base.qcow', '-F', FMT, top);
  qemuWrite(top, FMT, ['write -P 0x22 1000448 70144', 'write -P 0x23 2097152 512'], ref);
  t.equal(firstDiff(await ourView(top), ref), -1, 'overlay over its backing file reads as qemu wrote it');
  const i = await infoBoth(top, FMT);
  t.equal(i[0], i[1], 'info with a backing file equals qemu-img');
  const m = await mapBoth(top, FMT);
  t.equal(m[0], m[1], 'map of an overlay equals qemu-img');
  // our unaligned writes over the backing file copy the rest of each cluster from it
  await randomWrites(top, FMT, ref, 3, 20, 5000);
  await assertContents(t, dir, top, FMT, ref, 'our writes on an overlay');
  // commit into the backing file empties the overlay (qcow_make_empty)
  const cm = await cli(['commit', top]);
  t.equal(cm.code, 0, `commit: ${cm.stderr}`);
  await assertContents(t, dir, base, FMT, ref, 'the backing file after commit');
  await assertContents(t, dir, top, FMT, ref, 'the emptied overlay');
  t.equal(qemuImg('map', '--output', 'json', top).includes('"depth": 0'), false, 'nothing left in the overlay');

  // qemu-img convert -c fails for qcow in qemu 7.2 (EINVAL on multi-cluster requests): compress
  // cluster by cluster with qemu-io write -c
  const comp = path.join(dir, 'comp.qcow');
  qemuImg('create', '-q', '-f', FMT, comp, String(size));
  const pattern = Buffer.alloc(size);
  const cmds: string[] = [];
  for (let k = 0; k < 96; k++) {
    const off = k * 4096 * 7;
    cmds.push(`write -c -P 0x${(k + 1).toString(16)} ${off} 4096`);
    pattern.fill(k + 1, off, off + 4096);
  }
  qemuIo(comp, cmds, ['-f', FMT]);
  t.ok(fs.statSync(comp).size < 96 * 4096 / 2, 'qemu compressed the clusters');
  t.equal(firstDiff(await ourView(comp), pattern), -1, 'compressed clusters read identically');
  const ref2 = Buffer.from(pattern);
  await randomWrites(comp, FMT, ref2, 9, 20, 9000);
  await assertContents(t, dir, comp, FMT, ref2, 'writes into compressed clusters');
});

t.test('random unaligned writes pass qemu-img compare', async (t) => {
  const dir = tmpdir(t);
  const size = 6 << 20;
  const img = path.join(dir, 'w.qcow');
  qemuImg('create', '-q', '-f', FMT, img, String(size));
  const ref = Buffer.alloc(size);
  qemuWrite(img, FMT, ['write -P 0x5a 100000 300000'], ref);
  await randomWrites(img, FMT, ref, 17, 30);
  await assertContents(t, dir, img, FMT, ref, 'random writes');
  t.same(qemuIo(img, ['read -P 0x74 6291451 1'], ['-f', FMT]).includes('read 1/1 bytes'), true, 'qemu-io reads our last byte');
});

t.test('images we create', async (t) => {
  const dir = tmpdir(t);
  fs.writeFileSync(path.join(dir, 'b.raw'), Buffer.alloc(2 << 20, 0x61));
  for (const [what, size, backing] of [['plain', 7 << 20, undefined], ['over a backing file', null, 'b.raw']] as const) {
    const ours = path.join(dir, 'ours.qcow');
    const theirs = path.join(dir, 'theirs.qcow');
    await ourCreate(ours, FMT, size, {}, backing, backing ? 'raw' : undefined);
    qemuImg('create', '-q', '-f', FMT, ...(backing ? ['-b', backing, '-F', 'raw'] : []), theirs, ...(size ? [String(size)] : []));
    t.equal(Buffer.compare(fs.readFileSync(ours), fs.readFileSync(theirs)), 0, `${what}: byte-identical to qemu-img create`);
    const ref = backing ? Buffer.alloc(2 << 20, 0x61) : Buffer.alloc(size!);
    await randomWrites(ours, FMT, ref, 5, 15);
    await assertContents(t, dir, ours, FMT, ref, `our ${what} image`);
  }
  // AES encryption (issue 6, test/luks/qcow-aes.test.ts) needs encrypt.key-secret
  t.equal(await errKind(ourCreate(path.join(dir, 'e.qcow'), FMT, 1 << 20, { encryption: 'on' })), 'crypto', 'encryption=on without a secret refused');
  t.equal(await errKind(ourCreate(path.join(dir, 'e.qcow'), FMT, 1 << 20, { encrypt: { format: 'aes' } })), 'crypto',
    'encrypt.format=aes without a secret refused');
  t.equal(await errKind(ourCreate(path.join(dir, 'e.qcow'), FMT, 1 << 20, { cluster_size: '4096' })), 'usage', 'unknown option refused');
});

t.test('convert in and out', async (t) => {
  const dir = tmpdir(t);
  const src = path.join(dir, 'src.raw');
  const ref = Buffer.alloc(3 << 20);
  ref.fill(0x42, 70000, 900000);
  ref.fill(0x43, (2 << 20) + 5, (2 << 20) + 12345);
  fs.writeFileSync(src, ref);
  const img = path.join(dir, 'c.qcow');
  const r1 = await cli(['convert', '-O', FMT, src, img]);
  t.equal(r1.code, 0, `convert raw -> qcow: ${r1.stderr}`);
  await assertContents(t, dir, img, FMT, ref, 'converted');
  const back = path.join(dir, 'back.raw');
  const r2 = await cli(['convert', '-O', 'raw', img, back]);
  t.equal(r2.code, 0, `convert qcow -> raw: ${r2.stderr}`);
  t.equal(firstDiff(fs.readFileSync(back), ref), -1, 'round trip');
});

t.test('encrypted images are refused as unsupported', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'e.qcow');
  qemuImg('create', '-q', '-f', FMT, '--object', 'secret,id=s0,data=abc', '-o', 'encrypt.format=aes,encrypt.key-secret=s0', img, '1M');
  t.equal(await errKind(ourView(img)), 'crypto', 'AES qcow without a secret refused');
  t.equal((await cli(['info', img])).code, 4, 'info without a secret exits 4');
});

t.test('hostile headers give image errors', async (t) => {
  const dir = tmpdir(t);
  const good = path.join(dir, 'good.qcow');
  qemuImg('create', '-q', '-f', FMT, good, '4M');
  qemuWrite(good, FMT, ['write -P 0x5a 0 8192'], Buffer.alloc(4 << 20));
  const cases: Array<[string, number, Buffer]> = [
    ['backing name too long', 8, Buffer.concat([u64be(48n), u32be(5000)])],
    ['backing name past EOF', 8, Buffer.concat([u64be(1n << 40n), u32be(10)])],
    ['size 0', 24, u64be(0n)],
    ['size huge (L1 too large)', 24, u64be(1n << 62n)],
    ['cluster bits 8', 32, Buffer.from([8])],
    ['cluster bits 17', 32, Buffer.from([17])],
    ['L2 bits 5', 33, Buffer.from([5])],
    ['L2 bits 17', 33, Buffer.from([17])],
    ['crypt method 2', 36, u32be(2)],
    ['L1 table past EOF', 40, u64be(1n << 40n)],
  ];
  for (const [name, at, bytes] of cases) {
    const img = path.join(dir, 'h.qcow');
    fs.copyFileSync(good, img);
    patch(img, at, bytes);
    t.equal(await errKind(ourView(img, { format: FMT })), 'image', name);
  }
  const buf = fs.readFileSync(good);
  const l1 = Number(buf.readBigUInt64BE(40));
  const l2 = Number(buf.readBigUInt64BE(l1));
  const cases2: Array<[string, number, Buffer]> = [
    ['L2 table past EOF', l1, u64be(1n << 45n)],
    ['data cluster past EOF', l2, u64be(1n << 45n)],
    ['compressed cluster past EOF', l2, u64be((1n << 63n) | (100n << 51n) | (1n << 40n))],
    ['compressed cluster of garbage', l2, u64be((1n << 63n) | (100n << 51n) | 48n)],
  ];
  for (const [name, at, bytes] of cases2) {
    const img = path.join(dir, 'h.qcow');
    fs.copyFileSync(good, img);
    patch(img, at, bytes);
    t.equal(await errKind(ourView(img)), 'image', name);
  }
  // a valid compressed cluster written by hand decompresses; a bomb that inflates past one cluster does not
  const bomb = path.join(dir, 'bomb.qcow');
  fs.copyFileSync(good, bomb);
  const z = zlib.deflateRawSync(Buffer.alloc(1 << 20));
  const at = fs.statSync(bomb).size;
  fs.appendFileSync(bomb, z);
  patch(bomb, l2, u64be((1n << 63n) | (BigInt(Math.min(z.length, 4095)) << 51n) | BigInt(at)));
  t.equal(await errKind(ourView(bomb)), 'image', 'a cluster inflating past the cluster size is an image error');
  const n = await openImage(good, {});
  t.equal(await errKind(writeAt(n, Buffer.alloc(1), 4 << 20)), 'range', 'writes past the end are refused');
  await n.close();
});
