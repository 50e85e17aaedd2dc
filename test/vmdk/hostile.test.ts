// Hostile and unusual images: extent paths outside the descriptor's directory, broken
// headers, footers and tables give ImgError kind 'image' (never a crash or a huge allocation);
// seSparse extents read as qemu decodes them.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { ImgError } from '../../lib/core/errors';
import { probeFormat } from '../../lib/formats';
import { checkImage } from '../../lib/ops/check';
import { createImage } from '../../lib/ops/create';
import { hasQemu, kindOf, ourRaw, rng, sh, tmpdir, withImage } from './helpers';
import { readAt } from '../../lib/core/io';

const desc = (lines: string, type = 'monolithicFlat'): string =>
  `# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="${type}"\n\n# Extent description\n${lines}\n`;

t.test('extent paths outside the descriptor directory are refused', async (t) => {
  const dir = tmpdir(t);
  fs.mkdirSync(path.join(dir, 'sub'));
  fs.writeFileSync(path.join(dir, 'x.bin'), Buffer.alloc(1 << 20, 0x78));
  const up = path.join(dir, 'sub', 'up.vmdk');
  fs.writeFileSync(up, desc('RW 2048 FLAT "../x.bin" 0'));
  const abs = path.join(dir, 'sub', 'abs.vmdk');
  fs.writeFileSync(abs, desc('RW 1 FLAT "/etc/passwd" 0'));
  const abs2 = path.join(dir, 'sub', 'abs2.vmdk');
  fs.writeFileSync(abs2, desc('RW 2048 SPARSE "/etc/passwd"', 'twoGbMaxExtentSparse'));
  for (const img of [up, abs, abs2]) {
    let err: unknown = null;
    try { await ourRaw(img); } catch (e) { err = e; }
    t.ok(err instanceof ImgError, `${path.basename(img)} refused with an ImgError`);
    t.equal((err as ImgError).kind, 'image');
    t.match((err as Error).message, /outside the descriptor's directory/);
    t.notMatch((err as Error).message, /\n/, 'one line');
  }
  const data = await ourRaw(up, { 'x-allow-external-extents': 'on' });
  t.equal(data[12345], 0x78, 'x-allow-external-extents=on opens ../x.bin');
  t.equal(await kindOf(checkImage(up, { format: 'vmdk' }, 'none')), 'image', 'check refuses as well');
});

t.test('probe', async (t) => {
  const p = (s: string | Buffer): string => probeFormat(typeof s === 'string' ? Buffer.from(s) : s, 'x').name;
  t.equal(p('KDMV\x01\0\0\0'), 'vmdk');
  t.equal(p('COWD\x01\0\0\0'), 'vmdk');
  t.equal(p('# Disk DescriptorFile\nversion=1\n'), 'vmdk');
  t.equal(p('# comment\n  \r\nversion=1\r\nCID=1\n'), 'vmdk');
  t.equal(p('# comment\n\nversion=1\n'), 'raw', 'qemu accepts only blank lines of spaces');
  t.equal(p('hello\nversion=1\n'), 'raw');
});

t.test('hostile monolithicSparse headers', async (t) => {
  const dir = tmpdir(t);
  const good = path.join(dir, 'good.vmdk');
  await createImage({ format: 'vmdk', filename: good, size: '4M' });
  const base = fs.readFileSync(good);
  const cases: [string, (b: Buffer) => Buffer][] = [
    ['GTEs per GT > 512', (b) => { b.writeUInt32LE(1024, 44); return b; }],
    ['granularity 0', (b) => { b.writeBigUInt64LE(0n, 20); return b; }],
    ['granularity 2^40', (b) => { b.writeBigUInt64LE(1n << 40n, 20); return b; }],
    ['capacity 2^62', (b) => { b.writeBigUInt64LE(1n << 62n, 12); return b; }],
    ['capacity needing 40M GD entries', (b) => { b.writeBigUInt64LE(40n * 1024n * 1024n * 65536n, 12); return b; }],
    ['version 4', (b) => { b.writeUInt32LE(4, 4); return b; }],
    ['GD beyond EOF', (b) => { b.writeBigUInt64LE(1n << 30n, 56); return b; }],
    ['grain offset beyond EOF', (b) => { b.writeBigUInt64LE(1n << 30n, 64); return b; }],
    ['truncated to 100 bytes', (b) => b.subarray(0, 100)],
    ['no CID in the descriptor', (b) => { b.fill(0, 512, 512 * 21); return b; }],
    ['footer requested but missing', (b) => { b.writeBigUInt64LE(0xffffffffffffffffn, 56); return b; }],
  ];
  for (const [name, mutate] of cases) {
    const f = path.join(dir, 'bad.vmdk');
    fs.writeFileSync(f, mutate(Buffer.from(base)));
    t.equal(await kindOf(ourRaw(f)), 'image', name);
  }
  // a grain table entry pointing after EOF: reads zeros like a short file, check reports it
  const b = Buffer.from(base);
  const gd = Number(b.readBigUInt64LE(56)) * 512;
  const gt = b.readUInt32LE(gd) * 512;
  b.writeUInt32LE(0x7fffff00, gt);
  const f = path.join(dir, 'eof.vmdk');
  fs.writeFileSync(f, b);
  const r = await checkImage(f, { format: 'vmdk' }, 'none');
  t.ok((r.result?.corruptions ?? 0) > 0, 'our check finds the grain after EOF');
  if (hasQemu) t.not(sh('qemu-img', ['check', f], [0, 1, 2, 3]).code, 0, 'qemu-img check agrees');
  // a grain table after EOF
  const b2 = Buffer.from(base);
  b2.writeUInt32LE(0x7fffff00, gd);
  fs.writeFileSync(f, b2);
  t.equal(await kindOf(ourRaw(f)), 'image', 'grain table after EOF');
});

t.test('hostile streamOptimized: garbage compressed grain and bad marker', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 's.vmdk');
  await createImage({ format: 'vmdk', filename: img, size: '1M', options: { subformat: 'streamOptimized' } });
  await withImage(img, { readOnly: false }, async (n) => { await n.write!(Buffer.alloc(65536, 3), 0); });
  const b = fs.readFileSync(img);
  const grain = 128 * 512; // first grain follows the descriptor
  t.equal(b.readUInt32LE(grain + 8) > 0, true, 'grain marker present');
  const bad = Buffer.from(b);
  bad.fill(0x55, grain + 12, grain + 40);
  fs.writeFileSync(img, bad);
  t.equal(await kindOf(ourRaw(img)), 'image', 'corrupt deflate data');
  const bad2 = Buffer.from(b);
  bad2.writeUInt32LE(0xffffff, grain + 8);
  fs.writeFileSync(img, bad2);
  t.equal(await kindOf(ourRaw(img)), 'image', 'marker size too large');
  const bad3 = Buffer.from(b);
  bad3.writeUInt32LE(7, bad3.length - 1536 + 12);
  fs.writeFileSync(img, bad3);
  t.equal(await kindOf(ourRaw(img)), 'image', 'invalid footer marker');
  // writing to an allocated grain of a stream image is refused
  fs.writeFileSync(img, b);
  t.equal(await kindOf(withImage(img, { readOnly: false }, (n) => n.write!(Buffer.alloc(512), 0))), 'unsupported');
});

t.test('hostile descriptors', async (t) => {
  const dir = tmpdir(t);
  fs.writeFileSync(path.join(dir, 'e.bin'), Buffer.alloc(4096));
  const cases: [string, string, string][] = [
    ['no createType', '# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\nRW 8 FLAT "e.bin" 0\n', 'image'],
    ['unknown createType', desc('RW 8 FLAT "e.bin" 0', 'weird'), 'unsupported'],
    ['no extents', desc(''), 'image'],
    ['FLAT without offset', desc('RW 8 FLAT "e.bin"'), 'image'],
    ['absurd size', desc('RW 99999999999999999999 FLAT "e.bin" 0'), 'image'],
    ['unknown extent type', desc('RW 8 WEIRD "e.bin"'), 'image'],
    ['extents adding up past 2^52 bytes', desc(Array(300).fill('RW 8000000000000 FLAT "e.bin" 0').join('\n')), 'image'],
    ['sparse extent that is not sparse', desc('RW 8 SPARSE "e.bin"', 'twoGbMaxExtentSparse'), 'image'],
    ['missing extent file', desc('RW 8 FLAT "nope.bin" 0'), 'usage'],
  ];
  for (const [name, text, kind] of cases) {
    const f = path.join(dir, 'd.vmdk');
    fs.writeFileSync(f, text);
    t.equal(await kindOf(ourRaw(f)), kind, name);
  }
});

t.test('random header corruption never escapes as a plain error', async (t) => {
  const dir = tmpdir(t);
  const good = path.join(dir, 'good.vmdk');
  await createImage({ format: 'vmdk', filename: good, size: '2M' });
  await withImage(good, { readOnly: false }, async (n) => { await n.write!(Buffer.alloc(70000, 1), 0); });
  const base = fs.readFileSync(good);
  const r = rng(99);
  const f = path.join(dir, 'fuzz.vmdk');
  let plain = 0;
  for (let i = 0; i < 150; i++) {
    const b = Buffer.from(base);
    for (let k = 0; k < 4; k++) b[r(80)] = r(256);
    fs.writeFileSync(f, b);
    try {
      await withImage(f, {}, async (n) => { if (n.size <= 8 << 20) await readAt(n, Buffer.alloc(n.size), 0); });
    } catch (e) {
      if (!(e instanceof ImgError)) { plain++; t.comment(String(e)); }
    }
  }
  t.equal(plain, 0, 'only ImgErrors');
});

/** a minimal seSparse image: 2 MiB, 4 KiB grains, one grain table */
function seSparse(dir: string): { desc: string; expect: Buffer } {
  const file = path.join(dir, 'se-sesparse.vmdk');
  const gtSec = 3, grainsSec = 3 + 64;
  const b = Buffer.alloc((grainsSec + 3 * 8) * 512);
  b.writeBigUInt64LE(0xcafebaben, 0);
  b.writeBigUInt64LE(0x0000000200000001n, 8);
  b.writeBigUInt64LE(4096n, 16); // capacity (sectors)
  b.writeBigUInt64LE(8n, 24);
  b.writeBigUInt64LE(64n, 32);
  b.writeBigUInt64LE(1n, 80); // volatile header
  b.writeBigUInt64LE(1n, 88);
  b.writeBigUInt64LE(2n, 128); // grain dir
  b.writeBigUInt64LE(1n, 136);
  b.writeBigUInt64LE(BigInt(gtSec), 144);
  b.writeBigUInt64LE(64n, 152);
  b.writeBigUInt64LE(BigInt(grainsSec), 192);
  b.writeBigUInt64LE(24n, 200);
  b.writeBigUInt64LE(0xcafecafen, 512);
  b.writeBigUInt64LE(0x1000000000000000n, 1024); // GD[0] -> GT 0
  const gte = (g: number, v: bigint): void => { b.writeBigUInt64LE(v, gtSec * 512 + g * 8); };
  const alloc = (idx: number): bigint => 0x3000000000000000n | (BigInt(idx & 0xfff) << 48n) | BigInt(idx >> 12);
  gte(0, alloc(0)); gte(1, 0x2000000000000000n); gte(2, alloc(2)); gte(3, 0x1000000000000000n); gte(100, alloc(1));
  b.fill(0xa0, grainsSec * 512, grainsSec * 512 + 4096);
  b.fill(0xa1, (grainsSec + 8) * 512, (grainsSec + 16) * 512);
  b.fill(0xa2, (grainsSec + 16) * 512, (grainsSec + 24) * 512);
  fs.writeFileSync(file, b);
  const expect = Buffer.alloc(2 << 20);
  expect.fill(0xa0, 0, 4096);
  expect.fill(0xa2, 8192, 12288);
  expect.fill(0xa1, 100 * 4096, 101 * 4096);
  const d = path.join(dir, 'se.vmdk');
  fs.writeFileSync(d, desc('RW 4096 SESPARSE "se-sesparse.vmdk"', 'seSparse'));
  return { desc: d, expect };
}

t.test('seSparse reads as qemu decodes it', async (t) => {
  const dir = tmpdir(t);
  const { desc: d, expect } = seSparse(dir);
  const ours = await ourRaw(d);
  t.equal(Buffer.compare(ours, expect), 0, 'grains, zero grains and unmapped grains');
  if (hasQemu) {
    const out = path.join(dir, 'q.raw');
    sh('qemu-img', ['convert', '-f', 'vmdk', '-O', 'raw', d, out]);
    const q = fs.readFileSync(out);
    const i = q.findIndex((x, k) => x !== expect[k]);
    t.equal(i, -1, `qemu reads the same (first difference at ${i}: ${q[i]} vs ${expect[i]})`);
  }
  await withImage(d, {}, async (n) => {
    t.equal((await n.blockStatus(4096, 4096)).state, 'zero');
    t.equal((await n.blockStatus(16384, 4096)).state, 'unallocated');
  });
  t.equal(await kindOf(withImage(d, { readOnly: false }, async () => undefined)), 'unsupported', 'read-write open refused');
  const se = path.join(dir, 'se-sesparse.vmdk');
  const b = fs.readFileSync(se);
  b.writeBigUInt64LE(0x5000000000000000n, 3 * 512);
  fs.writeFileSync(se, b);
  t.equal(await kindOf(ourRaw(d)), 'image', 'invalid grain table entry');
  b.writeBigUInt64LE(0x2000000000000001n, 1024);
  fs.writeFileSync(se, b);
  t.equal(await kindOf(ourRaw(d)), 'image', 'invalid grain directory entry');
  b.writeBigUInt64LE(0xdeadn, 0);
  fs.writeFileSync(se, b);
  t.equal(await kindOf(ourRaw(d)), 'image', 'bad magic');
});

t.test('VMFSSPARSE (COWD) extent reads as in qemu', async (t) => {
  const dir = tmpdir(t);
  const b = Buffer.alloc(66 * 512);
  b.write('COWD', 0, 'latin1');
  b.writeUInt32LE(1, 4); b.writeUInt32LE(3, 8);
  b.writeUInt32LE(8192, 12); // disk sectors
  b.writeUInt32LE(16, 16); // granularity
  b.writeUInt32LE(1, 20); b.writeUInt32LE(1, 24); // GD at sector 1, one entry
  b.writeUInt32LE(2, 512); // GT at sector 2
  b.writeUInt32LE(34, 1024); // grain 0 -> sector 34
  b.writeUInt32LE(50, 1024 + 100 * 4); // grain 100 -> sector 50
  b.fill(0x71, 34 * 512, 50 * 512);
  b.fill(0x72, 50 * 512, 66 * 512);
  fs.writeFileSync(path.join(dir, 'c-delta.vmdk'), b);
  const d = path.join(dir, 'c.vmdk');
  fs.writeFileSync(d, desc('RW 8192 VMFSSPARSE "c-delta.vmdk"', 'vmfsSparse'));
  const expect = Buffer.alloc(4 << 20);
  expect.fill(0x71, 0, 8192);
  expect.fill(0x72, 100 * 8192, 101 * 8192);
  t.equal(Buffer.compare(await ourRaw(d), expect), 0, 'our read');
  if (hasQemu) {
    const out = path.join(dir, 'q.raw');
    sh('qemu-img', ['convert', '-f', 'vmdk', '-O', 'raw', d, out]);
    t.equal(Buffer.compare(fs.readFileSync(out), expect), 0, 'qemu reads the same');
  }
  b.writeUInt32LE(0, 16);
  fs.writeFileSync(path.join(dir, 'c-delta.vmdk'), b);
  t.equal(await kindOf(ourRaw(d)), 'image', 'granularity 0 refused');
});
