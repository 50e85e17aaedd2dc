// Virtual FAT disks (fat:...) read back identically with mtools and pass fsck.fat, with
// qemu's geometry (MBR, boot sector) for every FAT type and both floppy sizes.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { openImage } from '../../lib/core/graph';
import { blockStatusAt, readAt, writeAt } from '../../lib/core/io';
import { ImgError } from '../../lib/core/errors';
import { isWritableVvfat, parseFatSpec, vvfatRwRequested } from '../../lib/synth/vvfat';
import { hasCommand, imgmount, run, tmpdir } from '../helpers';
import { diffTrees, dumpNode, extract, failure, fsck, mt, img, peersMissing, sampleTree } from './helpers';

const missing = peersMissing();

t.test('fat: spec parsing uses qemu option names', async (t) => {
  t.same(parseFatSpec('fat:/x/y'), { driver: 'vvfat', dir: '/x/y' });
  t.same(parseFatSpec('fat:floppy:rw:12:/d'), { driver: 'vvfat', floppy: 'on', rw: 'on', 'fat-type': '12', dir: '/d' });
  t.same(parseFatSpec('fat:32:rw:rel/dir:with:colons'), { driver: 'vvfat', 'fat-type': '32', rw: 'on', dir: 'rel/dir:with:colons' });
  t.equal(vvfatRwRequested('fat:rw:/d'), true);
  t.equal(vvfatRwRequested('fat:floppy:12:/d'), false);
  t.equal(vvfatRwRequested('json:{"driver":"vvfat","dir":"/d","rw":true}'), true);
  t.equal(vvfatRwRequested('driver=vvfat,dir=/d,rw=on', { imageOpts: true }), true);
  t.equal(vvfatRwRequested('driver=vvfat,dir=/d', { imageOpts: true, options: { rw: 'on' } }), true);
  t.equal(vvfatRwRequested('/some/disk.img'), false);
  t.throws(() => parseFatSpec('fat:'), { name: 'ImgError' });
  t.throws(() => parseFatSpec('fat:12:16:/d'), { name: 'ImgError' });
});

const variants: Array<{ spec: string; size: number; fatType: number; big: boolean }> = [
  { spec: '', size: 528482304, fatType: 16, big: true },
  { spec: '12:', size: 33030144, fatType: 12, big: true },
  { spec: '32:', size: 528482304, fatType: 32, big: true },
  { spec: 'floppy:', size: 2949120, fatType: 12, big: false },
  { spec: 'floppy:12:', size: 1474560, fatType: 12, big: false },
  { spec: 'floppy:16:', size: 2949120, fatType: 16, big: false },
];

for (const v of variants) {
  t.test(`fat:${v.spec} reads back with mtools and passes fsck.fat`, { skip: missing }, async (t) => {
    const d = tmpdir(t);
    const src = path.join(d, 'src');
    fs.mkdirSync(src);
    sampleTree(src, v.big);
    const node = await openImage(`fat:${v.spec}${src}`);
    t.teardown(() => node.close());
    t.equal(node.size, v.size, 'qemu disk size');
    t.equal(node.readOnly, true, 'read-only by default');
    t.equal(node.driver, 'vvfat');
    const raw = path.join(d, 'disk.raw');
    await dumpNode(node, raw);
    const f = fsck(raw, d);
    t.equal(f.code, 0, `fsck.fat -n: ${f.stdout}${f.stderr}`);
    t.match(f.stdout, /files, \d+\/\d+ clusters/);
    const out = path.join(d, 'out');
    const x = extract(raw, out);
    t.equal(x.code, 0, `mcopy: ${x.stderr}`);
    fs.chmodSync(path.join(src, 'ro.txt'), 0o644); // mcopy writes files with default modes
    const diff = diffTrees(src, out);
    t.equal(diff.code, 0, `diff -r: ${diff.stdout}${diff.stderr}`);
    const boot = Buffer.alloc(512);
    await readAt(node, boot, v.spec.startsWith('floppy') ? 0 : 63 * 512);
    if (v.fatType === 32) t.equal(boot.subarray(0x52, 0x57).toString(), 'FAT32');
    else t.equal(boot.subarray(0x36, 0x3b).toString(), `FAT${v.fatType}`);
    // read-only attribute and short names with numeric tails
    const dir = mt('mdir', ['-i', img(raw), '::/']);
    t.match(dir.stdout, /COLLID~1 TXT/);
    t.match(dir.stdout, /COLLID~9 TXT/);
    t.match(dir.stdout, /COLLI~10 TXT/, 'two-digit tails shorten the base');
    const attr = mt('mattrib', ['-i', img(raw), '::/ro.txt']);
    t.match(attr.stdout, /^ {0,3}A {0,2}R|R/, `mattrib shows read-only: ${attr.stdout}`);
    t.match(mt('minfo', ['-i', img(raw)]).stdout, /QEMU VVFAT/);
  });
}

t.test('MBR and boot sectors match qemu-img for FAT16, FAT12 and floppies', { skip: hasCommand('qemu-img') ? false : 'qemu-img missing' }, async (t) => {
  const d = tmpdir(t);
  const src = path.join(d, 'src');
  fs.mkdirSync(src);
  fs.writeFileSync(path.join(src, 'f.txt'), 'x');
  for (const spec of ['', '12:', 'floppy:', 'floppy:12:']) {
    const q = path.join(d, 'q.raw');
    const r = run('qemu-img', ['convert', '-O', 'raw', `fat:${spec}${src}`, q]);
    t.equal(r.code, 0, r.stderr);
    const node = await openImage(`fat:${spec}${src}`);
    t.equal(node.size, fs.statSync(q).size, `size of fat:${spec}`);
    const qb = fs.readFileSync(q).subarray(0, 64 * 512);
    const ours = Buffer.alloc(64 * 512);
    await readAt(node, ours, 0);
    const bs = spec.startsWith('floppy') ? 0 : 63 * 512;
    if (!spec.startsWith('floppy')) t.same(ours.subarray(0, 512), qb.subarray(0, 512), `MBR of fat:${spec}`);
    t.same(ours.subarray(bs, bs + 0x3e), qb.subarray(bs, bs + 0x3e), `BPB of fat:${spec}`);
    t.equal(ours.readUInt16LE(bs + 510), 0xaa55);
    await node.close();
  }
});

t.test('a directory that does not fit is one ImgError, never a truncated disk', async (t) => {
  const d = tmpdir(t);
  fs.writeFileSync(path.join(d, 'big'), Buffer.alloc(2 << 20));
  t.match(await failure(openImage(`fat:floppy:12:${d}`)), { kind: 'image', message: /does not fit in FAT12 floppy/ });
  const e = await openImage(`fat:floppy:12:${d}`).catch((x: unknown) => x);
  t.ok(e instanceof ImgError && !e.message.includes('\n'), 'one line');
  t.match(await failure(openImage(`fat:floppy:32:${d}`)), { kind: 'usage' });
  t.match(await failure(openImage(`fat:${path.join(d, 'missing')}`)), { kind: 'usage' });
  t.match(await failure(openImage(`fat:${path.join(d, 'big')}`)), { kind: 'usage', message: /not a directory/ });
  // too many root entries for FAT16's fixed root directory
  const many = path.join(d, 'many');
  fs.mkdirSync(many);
  for (let i = 0; i < 600; i++) fs.writeFileSync(path.join(many, `F${i}`), '');
  t.match(await failure(openImage(`fat:${many}`)), { kind: 'image', message: /root directory/ });
  const n32 = await openImage(`fat:32:${many}`);
  t.equal(n32.size, 528482304, 'FAT32 has no root directory limit');
  await n32.close();
});

t.test('FAT32 grows with the content', { skip: missing }, async (t) => {
  const d = tmpdir(t);
  const src = path.join(d, 'src');
  fs.mkdirSync(src);
  // 520 MB of sparse files: more than qemu's fixed 504 MB
  for (let i = 0; i < 3; i++) {
    const fd = fs.openSync(path.join(src, `sparse${i}.bin`), 'w');
    fs.ftruncateSync(fd, (i === 2 ? 200 : 160) << 20);
    fs.writeSync(fd, Buffer.from(`tail ${i}`), 0, 6, ((i === 2 ? 200 : 160) << 20) - 6);
    fs.closeSync(fd);
  }
  t.match(await failure(openImage(`fat:${src}`)), { kind: 'image', message: /does not fit in FAT16/ });
  const node = await openImage(`fat:32:${src}`);
  t.teardown(() => node.close());
  t.ok(node.size > 520 * 1048576 * 1.2, `size ${node.size} leaves room`);
  // the last bytes of each file come from the host
  const raw = path.join(d, 'disk.raw');
  await dumpNode(node, raw);
  const f = fsck(raw, d);
  t.equal(f.code, 0, f.stdout + f.stderr);
  const out = path.join(d, 'out.bin');
  const r = mt('mcopy', ['-n', '-i', img(raw), '::/sparse2.bin', out]);
  t.equal(r.code, 0, r.stderr);
  t.equal(fs.statSync(out).size, 200 << 20);
  const tail = Buffer.alloc(6);
  const fd = fs.openSync(out, 'r');
  fs.readSync(fd, tail, 0, 6, (200 << 20) - 6);
  fs.closeSync(fd);
  t.equal(tail.toString(), 'tail 2');
});

t.test('symlinks and special files are skipped, never followed outside', { skip: missing }, async (t) => {
  const d = tmpdir(t);
  const src = path.join(d, 'src');
  const outside = path.join(d, 'outside');
  fs.mkdirSync(src);
  fs.mkdirSync(outside);
  fs.writeFileSync(path.join(outside, 'secret'), 'secret');
  fs.writeFileSync(path.join(src, 'ok.txt'), 'ok');
  fs.symlinkSync(outside, path.join(src, 'link-dir'));
  fs.symlinkSync(path.join(outside, 'secret'), path.join(src, 'link-file'));
  run('mkfifo', [path.join(src, 'fifo')]);
  const node = await openImage(`fat:${src}`);
  t.teardown(() => node.close());
  const raw = path.join(d, 'disk.raw');
  await dumpNode(node, raw);
  const dir = mt('mdir', ['-b', '-i', img(raw), '::/']);
  t.match(dir.stdout, /ok\.txt/i);
  t.notMatch(dir.stdout, /link|fifo/i);
  t.notOk(fs.readFileSync(raw).includes(Buffer.from('secret')), 'no byte of the outside file');
});

t.test('block status: data and zero, never a host mapping; writes refused read-only', async (t) => {
  const d = tmpdir(t);
  fs.writeFileSync(path.join(d, 'f'), Buffer.alloc(100000, 1));
  const node = await openImage(`fat:${d}`);
  t.teardown(() => node.close());
  let off = 0;
  let zero = 0;
  let data = 0;
  while (off < node.size) {
    const e = await blockStatusAt(node, off, node.size - off);
    t.equal(e.host, undefined);
    if (e.state === 'zero') zero += e.length; else data += e.length;
    t.not(e.state, 'unallocated');
    off += e.length;
  }
  t.equal(off, node.size);
  t.ok(zero > 500 << 20, 'free clusters are zero');
  t.ok(data > 100000 && data < 2 << 20, `data ${data}`);
  t.match(await failure(writeAt(node, Buffer.alloc(512), 0)), { kind: 'readonly' });
  t.equal(isWritableVvfat(node), false);
  const rw = await openImage(`fat:rw:${d}`);
  t.equal(isWritableVvfat(rw), true, 'rw: makes it writable (mount -s must refuse)');
  await rw.close();
  const forcedRo = await openImage(`fat:rw:${d}`, { readOnly: true });
  t.equal(forcedRo.readOnly, true);
  await forcedRo.close();
});

t.test('json:, --image-opts and the CLI open it like any image', async (t) => {
  const d = tmpdir(t);
  const src = path.join(d, 'src');
  fs.mkdirSync(src);
  fs.writeFileSync(path.join(src, 'hello.txt'), 'hello world\n');
  const a = await openImage(`json:{"driver":"vvfat","dir":${JSON.stringify(src)},"fat-type":12,"floppy":true,"label":"MYDISK"}`);
  t.equal(a.size, 1474560);
  const boot = Buffer.alloc(512);
  await readAt(a, boot, 0);
  t.equal(boot.subarray(0x2b, 0x36).toString(), 'MYDISK     ');
  await a.close();
  const b = await openImage(`driver=vvfat,dir=${src},fat-type=32`, { imageOpts: true });
  t.equal(b.size, 528482304);
  await b.close();
  t.match(await failure(openImage(`driver=vvfat,dir=${src},bogus=1`, { imageOpts: true })), { kind: 'usage', message: /bogus/ });
  t.match(await failure(openImage(`driver=vvfat,dir=${src},fat-type=24`, { imageOpts: true })), { kind: 'usage' });
  const info = imgmount(['info', '--output', 'json', `fat:${src}`]);
  t.equal(info.code, 0, info.stderr);
  const j = JSON.parse(info.stdout);
  t.equal(j.format, 'vvfat');
  t.equal(j['virtual-size'], 528482304);
  const out = path.join(d, 'out.raw');
  const cv = imgmount(['convert', '-O', 'raw', `fat:floppy:${src}`, out]);
  t.equal(cv.code, 0, cv.stderr);
  t.equal(fs.statSync(out).size, 2949120);
  if (!missing) {
    const ty = mt('mtype', ['-i', out, '::/hello.txt']);
    t.equal(ty.stdout, 'hello world\n');
  }
  const bad = imgmount(['info', `fat:floppy:12:${path.join(d, 'nope')}`]);
  t.equal(bad.code, 1);
  t.match(bad.stderr, /^imgmount: .*\n$/);
});

t.test('host times reach the directory entries', { skip: missing }, async (t) => {
  const d = tmpdir(t);
  const src = path.join(d, 'src');
  fs.mkdirSync(path.join(src, 'dir'), { recursive: true });
  fs.writeFileSync(path.join(src, 'old.txt'), 'x');
  const when = new Date(2001, 1, 3, 4, 5, 6);
  fs.utimesSync(path.join(src, 'old.txt'), when, when);
  fs.utimesSync(path.join(src, 'dir'), new Date(1999, 11, 31, 23, 58, 0), new Date(1999, 11, 31, 23, 58, 0));
  const node = await openImage(`fat:12:${src}`);
  t.teardown(() => node.close());
  const raw = path.join(d, 'disk.raw');
  await dumpNode(node, raw);
  const dir = mt('mdir', ['-i', img(raw), '::/']);
  t.match(dir.stdout, /OLD +TXT +1 2001-02-03 +4:05/);
  t.match(dir.stdout, /DIR +<DIR> +1999-12-31 +23:58/);
});
