import t from 'tap';
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import { bzip2Decompress } from '../../lib/formats/dmg/bzip2';
import { adcDecompress } from '../../lib/formats/dmg/adc';
import { lzfseDecompress, lzvnDecode } from '../../lib/formats/dmg/lzfse';
import { parsePlist, blkxData } from '../../lib/formats/dmg/plist';
import { ChunkCache } from '../../lib/formats/dmg/cache';
import { lzmaDecompress } from '../../lib/formats/dmg/lzma';
import { have } from './helpers';

function sampleData(): Buffer {
  const rnd = crypto.createHash('sha512');
  const parts: Buffer[] = [];
  for (let i = 0; i < 2000; i++) parts.push(rnd.update(String(i)).copy().digest().subarray(0, i % 7 === 0 ? 64 : 3));
  parts.push(Buffer.alloc(70000, 0x61)); // long runs (RLE1 and RUNA/RUNB)
  parts.push(Buffer.from('abcabcabcabd'.repeat(3000)));
  for (let i = 0; i < 256; i++) parts.push(Buffer.alloc(i % 9, i));
  return Buffer.concat(parts);
}

t.test('bzip2 decodes what bzip2(1) writes, at every block size, concatenated streams too', { skip: have('bzip2') ? false : 'bzip2 not installed' }, async (t) => {
  const data = sampleData();
  for (const lvl of ['-1', '-5', '-9']) {
    const z = execFileSync('bzip2', [lvl, '-c'], { input: data, maxBuffer: 1 << 26 });
    t.ok(bzip2Decompress(z, data.length).equals(data), `level ${lvl}`);
  }
  const a = Buffer.from('first stream ');
  const b = Buffer.alloc(5000, 0x7a);
  const cat = Buffer.concat([execFileSync('bzip2', ['-c'], { input: a }), execFileSync('bzip2', ['-c'], { input: b })]);
  t.ok(bzip2Decompress(cat, a.length + b.length).equals(Buffer.concat([a, b])), 'two streams');
  const z = execFileSync('bzip2', ['-9', '-c'], { input: data, maxBuffer: 1 << 26 });
  t.throws(() => bzip2Decompress(z, data.length - 1), /larger than declared/, 'output larger than declared');
  t.throws(() => bzip2Decompress(z, data.length + 1), /expected/, 'output smaller than declared');
  t.throws(() => bzip2Decompress(z.subarray(0, z.length >> 1), data.length), /truncated/, 'truncated input');
  const bad = Buffer.from(z);
  bad[10] ^= 0xff; // block CRC
  t.throws(() => bzip2Decompress(bad, data.length), /bzip2/, 'CRC mismatch');
  const bad2 = Buffer.from(z);
  bad2[z.length >> 1] ^= 0x55;
  t.throws(() => bzip2Decompress(bad2, data.length), /bzip2/, 'corrupt payload');
  t.throws(() => bzip2Decompress(Buffer.from('BZh0'), 1), /block size/, 'bad level');
});

t.test('ADC: literal runs and both copy codes', async (t) => {
  // "abc" literal, 2-byte code: copy 6 from distance 3, 3-byte code: copy 9 from distance 9, literal "Z"
  const src = Buffer.from([0x82, 0x61, 0x62, 0x63, (3 << 2) | 0, 2, 0x40 | 5, 0, 8, 0x80, 0x5a]);
  const want = Buffer.from('abcabcabc' + 'abcabcabc' + 'Z');
  t.ok(adcDecompress(src, want.length).equals(want), 'decodes');
  t.throws(() => adcDecompress(src, want.length + 1), /expected/, 'short output');
  t.throws(() => adcDecompress(src, want.length - 1), /larger/, 'long output');
  t.throws(() => adcDecompress(Buffer.from([0x00, 0x05]), 4), /before the start/, 'distance before start');
  t.throws(() => adcDecompress(Buffer.from([0x85, 0x61]), 6), /past the input/, 'truncated literal');
});

t.test('LZVN and LZFSE stored blocks', async (t) => {
  // sml_l "hello" (0xE5), sml_d L=0 M=3 D=5 (0x00 0x05) -> "hel", sml_m M=2 (0xF2) -> "lo", eos
  const lzvn = Buffer.from([0xe5, ...Buffer.from('hello'), 0x00, 0x05, 0xf2, 0x06, 0, 0, 0, 0, 0, 0, 0]);
  const out = Buffer.alloc(10);
  const [, end] = lzvnDecode(lzvn, 0, lzvn.length, out, 0, 10);
  t.equal(end, 10);
  t.equal(out.toString(), 'hellohello');
  // the same as a "bvxn" block inside an LZFSE stream, followed by a stored "bvx-" block
  const hdr = Buffer.alloc(12);
  hdr.write('bvxn', 0, 'latin1');
  hdr.writeUInt32LE(10, 4);
  hdr.writeUInt32LE(lzvn.length, 8);
  const raw = Buffer.alloc(8);
  raw.write('bvx-', 0, 'latin1');
  raw.writeUInt32LE(3, 4);
  const stream = Buffer.concat([hdr, lzvn, raw, Buffer.from('xyz'), Buffer.from('bvx$', 'latin1')]);
  t.equal(lzfseDecompress(stream, 13).toString(), 'hellohelloxyz');
  t.throws(() => lzfseDecompress(stream, 14), /expected/, 'short output');
  t.throws(() => lzfseDecompress(stream, 12), /larger than declared/, 'long output');
  t.throws(() => lzfseDecompress(stream.subarray(0, stream.length - 4), 13), /end marker/, 'missing end marker');
  const badD = Buffer.from(lzvn);
  badD[7] = 0x09; // distance 9 > 5 bytes written
  t.throws(() => lzvnDecode(badD, 0, badD.length, Buffer.alloc(10), 0, 10), /distance/, 'bad distance');
  t.throws(() => lzvnDecode(Buffer.from([0x1e, 0, 0, 0]), 0, 4, Buffer.alloc(4), 0, 4), /undefined opcode/, 'undefined opcode');
  t.throws(() => lzfseDecompress(Buffer.from('bvx2\x10\0\0\0', 'latin1'), 16), /truncated/, 'truncated v2 header');
});

t.test('plist subset parser', async (t) => {
  const v = parsePlist('<?xml version="1.0"?><!-- c --><plist version="1.0"><dict><key>a&amp;b</key><string>x &lt;&#65;&#x42;&gt;</string>' +
    '<key>n</key><integer>-12</integer><key>h</key><integer>0x10</integer><key>t</key><true/><key>arr</key><array><data>AAEC\n Aw==</data><real>1.5</real></array><key>e</key><dict/></dict></plist>');
  t.same(JSON.parse(JSON.stringify(v)), { 'a&b': 'x <AB>', n: -12, h: 16, t: true, arr: [{ type: 'Buffer', data: [0, 1, 2, 3] }, 1.5], e: {} });
  t.throws(() => parsePlist('<plist><dict><key>a</key></dict></plist>'), /malformed/, 'key without value');
  t.throws(() => parsePlist('<plist><dict><string>a</string></dict></plist>'), /expected <key>/, 'value without key');
  t.throws(() => parsePlist('<plist><foo/></plist>'), /unsupported element/);
  t.throws(() => parsePlist('<plist><array><string>x</array></plist>'), /malformed/, 'mismatched close');
  t.throws(() => parsePlist('<plist><string>&#x110000;</string></plist>'), /character reference/);
  t.throws(() => blkxData(parsePlist('<plist><dict/></plist>')), /resource-fork/);
  t.throws(() => blkxData(parsePlist('<plist><dict><key>resource-fork</key><dict><key>blkx</key><array><dict/></array></dict></dict></plist>')), /no Data/);
});

t.test('chunk cache is bounded by bytes and shares concurrent loads', async (t) => {
  const c = new ChunkCache(100);
  let loads = 0;
  const mk = (n: number) => async (): Promise<Buffer> => { loads++; return Buffer.alloc(n); };
  await c.get(1, mk(60));
  await c.get(2, mk(60));
  t.ok(c.size <= 100, `size ${c.size} <= 100`);
  await c.get(2, mk(60));
  t.equal(loads, 2, 'hit');
  await c.get(1, mk(60));
  t.equal(loads, 3, 'evicted entry reloads');
  await c.get(3, mk(500));
  t.ok(c.size <= 100, 'oversized entries are not kept');
  const [a, b] = await Promise.all([c.get(9, mk(10)), c.get(9, mk(10))]);
  t.equal(a, b, 'one load for concurrent requests');
  t.equal(loads, 5);
});

t.test('xz (dmg LZMA chunks) decodes what xz(1) writes: checks, blocks, concatenated streams', { skip: have('xz') ? false : 'xz not installed' }, async (t) => {
  const data = sampleData();
  const xz = (...args: string[]): Buffer => execFileSync('xz', ['-c', '-T1', ...args], { input: data, maxBuffer: 1 << 26 });
  for (const args of [[], ['-C', 'crc32'], ['-C', 'sha256'], ['-C', 'none'], ['-9e'], ['-0'], ['--block-size=50000']]) {
    t.ok(lzmaDecompress(xz(...args), data.length).equals(data), `xz ${args.join(' ')}`);
  }
  const z = xz();
  t.ok(lzmaDecompress(Buffer.concat([z, Buffer.alloc(8), z]), 2 * data.length).equals(Buffer.concat([data, data])), 'two streams with padding');
  t.throws(() => lzmaDecompress(z, data.length - 1), /larger than declared/, 'output larger than declared');
  t.throws(() => lzmaDecompress(z, data.length + 1), /expected/, 'output smaller than declared');
  t.throws(() => lzmaDecompress(z.subarray(0, z.length >> 1), data.length), /LZMA/, 'truncated');
  const bad = Buffer.from(z);
  bad[bad.length >> 1] ^= 0x10;
  t.throws(() => lzmaDecompress(bad, data.length), /LZMA/, 'corrupt payload');
  const badHdr = Buffer.from(z);
  badHdr[7] ^= 0x01;
  t.throws(() => lzmaDecompress(badHdr, data.length), /stream header|check type/, 'corrupt stream flags');
  t.throws(() => lzmaDecompress(execFileSync('xz', ['-c', '--x86', '--lzma2'], { input: data.subarray(0, 1000) }), 1000), /only the LZMA2 filter|unsupported filter/, 'BCJ filter refused');
});
