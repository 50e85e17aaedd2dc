import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync, spawnSync } from 'node:child_process';
import { openImage } from '../../lib/core/graph';
import { ImgError } from '../../lib/core/errors';
import { dmgDriver, probeTail } from '../../lib/formats/dmg';
import { IMAGES, SHARED_DMG, have, imgError, imgmount, openAndRead, ourView, qemuRaw, readAll, run, sha256, tmpdir } from './helpers';
import { buildDmg, T, zlibChunk } from './dmgbuild';
import { imageInfo } from '../../lib/ops/info';
import { convertImage } from '../../lib/ops/convert';

const DISK_SHA_PREFIX = '0786ad1fdcba31a3';
const COMPRESSIONS = ['adc', 'bz2', 'lzfse', 'raw', 'zlib'];
const sample = (name: string): string => path.join(IMAGES, name);

t.test('every compression-*.dmg reads as the same 5 MiB disk', async (t) => {
  for (const c of COMPRESSIONS) {
    const img = sample(`dmg-compression-${c}.dmg`);
    const b = await ourView(img); // probed by the .dmg name
    t.equal(b.length, 5 * 1024 * 1024, `${c}: size`);
    t.equal(sha256(b).slice(0, 16), DISK_SHA_PREFIX, `${c}: sha256`);
  }
});

t.test('images read as dmg2img decodes them', { skip: have('dmg2img') ? false : 'dmg2img not installed' }, async (t) => {
  const dir = tmpdir(t);
  // dmg2img 1.6.7 has no LZFSE: those chunks are checked by the known hash above
  const imgs = ['dmg-gpt.dmg', 'dmg-zlib-compressed.dmg', ...COMPRESSIONS.filter((c) => c !== 'lzfse').map((c) => `dmg-compression-${c}.dmg`)].map(sample);
  for (const extra of ['raw.dmg', 'encrypted.dmg']) if (fs.existsSync(path.join(SHARED_DMG, extra))) imgs.push(path.join(SHARED_DMG, extra));
  for (const img of imgs) {
    const out = path.join(dir, path.basename(img) + '.raw');
    run('dmg2img', ['-i', img, '-o', out]);
    const ref = fs.readFileSync(out);
    const ours = await ourView(img, 'dmg');
    t.ok(ours.equals(ref), `${path.basename(img)}: equal to dmg2img (${ours.length} vs ${ref.length} bytes)`);
  }
});

t.test('raw and zlib chunks read as qemu-img reads them; info equals qemu-img info', async (t) => {
  const dir = tmpdir(t);
  for (const name of ['dmg-compression-raw.dmg', 'dmg-compression-zlib.dmg', 'dmg-gpt.dmg', 'dmg-zlib-compressed.dmg']) {
    const img = sample(name);
    t.ok((await ourView(img, 'dmg')).equals(qemuRaw(dir, img, 'dmg')), `${name}: equal to qemu-img convert`);
    const theirs = JSON.parse(run('qemu-img', ['info', '--output', 'json', img]));
    const [ours] = await imageInfo(img, {}, false);
    t.same(JSON.parse(JSON.stringify(ours)), theirs, `${name}: info JSON`);
  }
});

t.test('map: extents tile the disk; raw chunks map to the host file, ignore chunks read as zero', async (t) => {
  const img = sample('dmg-compression-raw.dmg');
  const r = imgmount(['map', '--output', 'json', img]);
  t.equal(r.code, 0);
  const ext = JSON.parse(r.out) as { start: number; length: number; data: boolean; zero: boolean; offset?: number }[];
  let pos = 0;
  for (const e of ext) { t.equal(e.start, pos, 'contiguous'); pos += e.length; }
  t.equal(pos, 5 * 1024 * 1024, 'covers the disk');
  t.ok(ext.some((e) => e.data && e.offset !== undefined), 'some data with a host offset');
  t.ok(ext.some((e) => e.zero && !e.data), 'some zero extents');
  // the host offsets really hold the guest bytes
  const file = fs.readFileSync(img);
  const disk = await ourView(img);
  for (const e of ext.filter((x) => x.data && x.offset !== undefined)) {
    t.ok(file.subarray(e.offset!, e.offset! + e.length).equals(disk.subarray(e.start, e.start + e.length)), `host bytes at ${e.offset}`);
  }
});

t.test('convert out of dmg (bzip2, LZFSE, ADC) gives images qemu reads identically', async (t) => {
  const dir = tmpdir(t);
  for (const c of ['bz2', 'lzfse', 'adc', 'zlib']) {
    const out = path.join(dir, `${c}.qcow2`);
    await convertImage({ src: sample(`dmg-compression-${c}.dmg`), srcOpen: {}, dst: out, outFormat: 'qcow2' });
    run('qemu-img', ['check', out]);
    t.equal(sha256(qemuRaw(dir, out, 'qcow2')).slice(0, 16), DISK_SHA_PREFIX, `${c}: qemu reads the converted disk`);
  }
});

t.test('always opened read-only; nothing is written', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'x.dmg');
  fs.copyFileSync(sample('dmg-compression-zlib.dmg'), img);
  const before = sha256(fs.readFileSync(img));
  const n = await openImage(img, { readOnly: false, format: 'dmg' });
  t.equal(n.readOnly, true, 'node is read-only');
  t.equal(n.write, undefined, 'no write method');
  t.equal(dmgDriver.readOnlyFormat, true);
  await readAll(n);
  await n.close();
  t.equal(sha256(fs.readFileSync(img)), before, 'file unchanged');
});

t.test('encrypted (encrcdsa) images give one clear error', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'enc.dmg');
  const head = Buffer.alloc(4096);
  head.write('encrcdsa', 0, 'latin1');
  head.writeUInt32BE(2, 8);
  fs.writeFileSync(img, Buffer.concat([head, Buffer.alloc(8192, 0x5a)]));
  const e = await imgError(openImage(img, { readOnly: true }));
  t.ok(e instanceof ImgError, String(e));
  if (e instanceof ImgError) {
    t.equal(e.kind, 'unsupported');
    t.equal(e.message, 'encrypted dmg images are not supported');
  }
  const r = imgmount(['info', img]);
  t.equal(r.code, 2, 'exit code 2');
  t.equal(r.err.trim().split('\n').length, 1, 'one line');
  t.match(r.err, /encrypted dmg images are not supported/);
});

t.test('synthetic images: every chunk type (LZMA as xz), gaps', { skip: have('bzip2') && have('xz') ? false : 'bzip2 or xz not installed' }, async (t) => {
  const dir = tmpdir(t);
  const s0 = Buffer.alloc(512 * 4, 0x11);
  const s1 = Buffer.alloc(512 * 3);
  for (let i = 0; i < s1.length; i++) s1[i] = (i * 7) & 0xff;
  const bz = execFileSync('bzip2', ['-c'], { input: s1 });
  const xz = execFileSync('xz', ['-c'], { input: s1 });
  const img = path.join(dir, 's.dmg');
  fs.writeFileSync(img, buildDmg({
    sectorCount: 32,
    chunks: [
      { type: T.raw, sector: 0, count: 4, data: s0 },
      { type: T.comment, sector: 4, count: 0 },
      { type: T.zlib, sector: 4, count: 3, data: zlibChunk(s1) },
      { type: T.zero, sector: 7, count: 2 },
      { type: T.bzip2, sector: 9, count: 3, data: bz },
      { type: T.ignore, sector: 12, count: 4 },
      // sectors 16..19 are covered by no chunk: zeros
      { type: T.zlib, sector: 20, count: 3, data: zlibChunk(s1) },
      { type: T.lzma, sector: 23, count: 3, data: xz },
    ],
  }));
  const b = await ourView(img, 'dmg');
  const want = Buffer.alloc(32 * 512);
  s0.copy(want, 0); s1.copy(want, 4 * 512); s1.copy(want, 9 * 512); s1.copy(want, 20 * 512); s1.copy(want, 23 * 512);
  t.ok(b.equals(want), 'content');
  // qemu agrees where it reads these chunk types (it errors on the gap, so compare the chunks)
  const n = await openImage(img, { readOnly: true, format: 'dmg' });
  const st = await n.blockStatus(0, n.size);
  t.equal(st.state, 'data');
  t.equal(st.length, 4 * 512, 'raw extent stops at the zlib chunk');
  t.ok(st.host, 'raw chunk has a host location');
  const z = await n.blockStatus(7 * 512, 25 * 512);
  t.equal(z.state, 'zero', 'zero chunk');
  t.equal(z.length, 2 * 512, 'zero extent ends at the bzip2 chunk');
  const ig = await n.blockStatus(12 * 512, 20 * 512);
  t.same([ig.state, ig.length], ['zero', 4 * 512], 'ignore chunk reads as zero');
  const gap = await n.blockStatus(16 * 512, 16 * 512);
  t.same([gap.state, gap.length], ['zero', 4 * 512], 'uncovered sectors read as zero');
  await n.close();
});

t.test('old binary resource fork block tables read as qemu reads them', async (t) => {
  const dir = tmpdir(t);
  const a = Buffer.alloc(512 * 8);
  for (let i = 0; i < a.length; i++) a[i] = (i * 13 + (i >> 9)) & 0xff;
  const img = path.join(dir, 'rsrc.dmg');
  fs.writeFileSync(img, buildDmg({
    rsrc: true,
    sectorCount: 24,
    chunks: [
      { type: T.zlib, sector: 0, count: 8, data: zlibChunk(a) },
      { type: T.zero, sector: 8, count: 8 },
      { type: T.raw, sector: 16, count: 8, data: a },
    ],
  }));
  const ours = await ourView(img, 'dmg');
  t.ok(ours.equals(Buffer.concat([a, Buffer.alloc(4096), a])), 'content');
  t.ok(ours.equals(qemuRaw(dir, img, 'dmg')), 'equal to qemu-img convert');
});

t.test('hostile images give one-line image errors', async (t) => {
  const dir = tmpdir(t);
  const one = Buffer.alloc(512, 0x42);
  let i = 0;
  const check = async (what: string, data: Buffer, kind = 'image', re?: RegExp): Promise<void> => {
    const f = path.join(dir, `h${i++}.dmg`);
    fs.writeFileSync(f, data);
    const e = await openAndRead(f, 'dmg');
    t.ok(e instanceof ImgError, `${what}: ImgError (${String(e)})`);
    if (e instanceof ImgError) {
      t.equal(e.kind, kind, `${what}: kind`);
      t.notOk(e.message.includes('\n'), `${what}: one line`);
      if (re) t.match(e.message, re, `${what}: message`);
    }
  };
  const ok = { sectorCount: 1, chunks: [{ type: T.raw, sector: 0, count: 1, data: one }] };
  // sanity: the unmodified synthetic image opens
  const f0 = path.join(dir, 'ok.dmg');
  fs.writeFileSync(f0, buildDmg(ok));
  t.ok((await ourView(f0, 'dmg')).equals(one), 'baseline image reads');

  await check('too short', Buffer.alloc(100), 'image', /at least 512/);
  await check('no trailer', Buffer.alloc(4096, 1), 'image', /koly/);
  await check('truncated', buildDmg(ok).subarray(0, buildDmg(ok).length - 700), 'image');
  await check('xml beyond file', buildDmg({ ...ok, koly: (k) => k.writeBigUInt64BE(1n << 40n, 0xe0) }), 'image', /property list/);
  await check('data fork beyond file', buildDmg({ ...ok, koly: (k) => k.writeBigUInt64BE(1n << 50n, 0x18) }), 'image', /data fork/);
  await check('bad resource fork', buildDmg({ ...ok, rsrc: true, koly: (k) => k.writeBigUInt64BE(10n, 0x30) }), 'image', /resource fork/);
  await check('no tables', buildDmg({ ...ok, koly: (k) => k.writeBigUInt64BE(0n, 0xe0) }), 'image', /no block tables/);
  await check('huge chunk count', buildDmg({ ...ok, declaredChunks: 0xffffffff }), 'image', /declares/);
  await check('overlapping chunks', buildDmg({ sectorCount: 4, chunks: [{ type: T.raw, sector: 0, count: 2, data: Buffer.alloc(1024) }, { type: T.raw, sector: 1, count: 2, data: Buffer.alloc(1024) }] }), 'image', /overlap/);
  await check('chunk past the disk', buildDmg({ sectorCount: 1, chunks: [{ type: T.raw, sector: 0, count: 2, data: Buffer.alloc(1024) }] }), 'image', /beyond the disk/);
  await check('chunk data outside the file', buildDmg({ sectorCount: 1, chunks: [{ type: T.zlib, sector: 0, count: 1, data: zlibChunk(one), offset: 1e12 }] }), 'image', /outside/);
  await check('huge sector count', buildDmg({ sectorCount: 1 << 20, chunks: [{ type: T.zlib, sector: 0, count: (1 << 17) + 1, data: zlibChunk(one) }] }), 'image', /larger than max/);
  await check('huge stored length', buildDmg({ sectorCount: 1, chunks: [{ type: T.zlib, sector: 0, count: 1, data: zlibChunk(one), length: 65 << 20 }] }), 'image', /larger than max/);
  await check('raw length mismatch', buildDmg({ sectorCount: 2, chunks: [{ type: T.raw, sector: 0, count: 2, data: one }] }), 'image', /raw chunk/);
  await check('unknown chunk type', buildDmg({ sectorCount: 1, chunks: [{ type: 0x80000010, sector: 0, count: 1, data: one }] }), 'image', /unknown type/);
  await check('corrupt zlib data', buildDmg({ sectorCount: 1, chunks: [{ type: T.zlib, sector: 0, count: 1, data: Buffer.alloc(40, 0x33) }] }), 'image', /zlib/);
  await check('zlib short output', buildDmg({ sectorCount: 2, chunks: [{ type: T.zlib, sector: 0, count: 2, data: zlibChunk(one) }] }), 'image', /expected 1024/);
  await check('zlib long output', buildDmg({ sectorCount: 1, chunks: [{ type: T.zlib, sector: 0, count: 1, data: zlibChunk(Buffer.alloc(4096)) }] }), 'image');
  await check('corrupt bzip2', buildDmg({ sectorCount: 1, chunks: [{ type: T.bzip2, sector: 0, count: 1, data: Buffer.from('BZh9garbagegarbage') }] }), 'image', /bzip2/);
  await check('corrupt ADC', buildDmg({ sectorCount: 1, chunks: [{ type: T.adc, sector: 0, count: 1, data: Buffer.from([0x00, 0x10]) }] }), 'image', /ADC/);
  await check('corrupt LZMA', buildDmg({ sectorCount: 1, chunks: [{ type: T.lzma, sector: 0, count: 1, data: Buffer.from('\xfd7zXZ\0garbage', 'latin1') }] }), 'image', /LZMA/);
  await check('corrupt LZFSE', buildDmg({ sectorCount: 1, chunks: [{ type: T.lzfse, sector: 0, count: 1, data: Buffer.from('bvx2\0\0\0\0') }] }), 'image', /LZFSE/);
  await check('malformed XML', buildDmg({ ...ok, xml: '<plist><dict><key>resource-fork</key><dict>' }), 'image', /property list/);
  await check('DTD internal subset', buildDmg({ ...ok, xml: '<!DOCTYPE plist [<!ENTITY a "b">]><plist><dict/></plist>' }), 'image', /DTD/);
  await check('bad base64', buildDmg({ ...ok, xml: '<plist><dict><key>resource-fork</key><dict><key>blkx</key><array><dict><key>Data</key><data>@@@@</data></dict></array></dict></dict></plist>' }), 'image', /base64/);
  await check('deep nesting', buildDmg({ ...ok, xml: '<plist>' + '<array>'.repeat(200) + '</array>'.repeat(200) + '</plist>' }), 'image', /deep/);

  // a property list larger than the cap is refused before it is read (sparse file)
  const big = path.join(dir, 'bigxml.dmg');
  const fd = fs.openSync(big, 'w');
  const k = buildDmg(ok).subarray(-512);
  k.writeBigUInt64BE(1000n, 0xd8);
  k.writeBigUInt64BE(20n << 20n, 0xe0);
  fs.writeSync(fd, k, 0, 512, 32 << 20);
  fs.closeSync(fd);
  const e = await openAndRead(big, 'dmg');
  t.ok(e instanceof ImgError && e.kind === 'image' && /larger than max/.test(e.message), `oversized XML: ${String(e)}`);
});

t.test('probeTail recognises the koly trailer', async (t) => {
  const f = fs.readFileSync(sample('dmg-gpt.dmg'));
  t.equal(probeTail(f.subarray(-1024), f.length), 50);
  t.equal(probeTail(Buffer.alloc(1024), f.length), 0);
  t.equal(probeTail(f.subarray(-100), f.length), 0, 'short tail');
  t.equal(typeof (dmgDriver as unknown as { probeTail: unknown }).probeTail, 'function', 'on the driver object');
  t.equal(dmgDriver.probe!(Buffer.alloc(512), 'X.DMG'), 2, 'probe by name');
  t.equal(dmgDriver.probe!(Buffer.alloc(512), 'x.img'), 0);
});

t.test('CLI: a truncated sample fails with exit 2 and one line', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'cut.dmg');
  fs.writeFileSync(img, fs.readFileSync(sample('dmg-compression-zlib.dmg')).subarray(0, 3000));
  const r = spawnSync(process.execPath, [path.resolve(__dirname, '../../../bin/imgmount'), 'convert', '-O', 'raw', img, path.join(dir, 'o.raw')], { encoding: 'utf8' });
  t.equal(r.status, 2);
  t.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
});
