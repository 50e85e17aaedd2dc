// vhdx against qemu-img / qemu-io 7.2: create, 4096-byte sectors, convert, check, log replay, hostile images.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { openImage } from '../../lib/core/graph';
import { readAt, writeAt } from '../../lib/core/io';
import { createImage } from '../../lib/ops/create';
import { convertImage } from '../../lib/ops/convert';
import { checkImage } from '../../lib/ops/check';
import { checksum, HEADER1, HEADER2, MiB, newGuid, parseHeader, serializeHeader } from '../../lib/formats/vhdx/format';
import { buildEntry } from '../../lib/formats/vhdx/log';
import { errKind, errMessage, firstDiff, ourView, qemuImg, qemuImgStatus, qemuIo, qemuRaw, tmpdir } from '../qcow2/helpers';

function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return x / 4294967296; };
}

t.test('images we create pass qemu-img check and read in qemu', async (t) => {
  const dir = tmpdir(t);
  const variants: Record<string, string>[] = [{}, { subformat: 'fixed' }, { block_state_zero: 'off' },
    { subformat: 'fixed', block_state_zero: 'off', block_size: '1M' }, { block_size: '1500k', log_size: '1500k' }, { block_size: '512M' }];
  for (const o of variants) {
    const ours = path.join(dir, 'o.vhdx');
    const theirs = path.join(dir, 'q.vhdx');
    const size = 30 * MiB + 3 * 512;
    await createImage({ format: 'vhdx', filename: ours, size, options: { ...o } });
    const qo = Object.entries(o).map(([k, v]) => `${k}=${v}`).join(',');
    qemuImg('create', '-q', '-f', 'vhdx', ...(qo ? ['-o', qo] : []), theirs, String(size));
    const qi = JSON.parse(qemuImg('info', '--output', 'json', '-f', 'vhdx', theirs));
    const oi = JSON.parse(qemuImg('info', '--output', 'json', '-f', 'vhdx', ours));
    t.equal(oi['virtual-size'], qi['virtual-size'], `virtual size ${qo}`);
    t.equal(oi['cluster-size'], qi['cluster-size'], `block size ${qo}`);
    t.equal(fs.statSync(ours).size, fs.statSync(theirs).size, `file size ${qo}`);
    t.equal(qemuImgStatus('check', '-f', 'vhdx', ours).code, 0, `qemu-img check ${qo}`);
    qemuIo(ours, ['write -P 0x77 1M 70k'], ['-f', 'vhdx']);
    const n = await openImage(ours, { format: 'vhdx' });
    const got = Buffer.alloc(70 * 1024);
    await readAt(n, got, MiB);
    t.ok(got.every((x) => x === 0x77), 'qemu writes into our image read back');
    await writeAt(n, Buffer.alloc(5000, 0x99), 20 * MiB - 7);
    await n.close();
    t.equal(qemuImgStatus('check', '-f', 'vhdx', ours).code, 0, 'clean after our write');
    const out = qemuIo(ours, ['read -P 0x99 20971513 5000'], ['-f', 'vhdx', '-r']);
    t.notMatch(out, /fail/i, 'qemu reads our write');
  }
  t.equal(await errKind(createImage({ format: 'vhdx', filename: path.join(dir, 'x.vhdx'), size: 1 << 20, options: { block_size: '3000k' } })), 'usage', 'block size not a power of two');
});

t.test('4096-byte logical sectors', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 's.vhdx');
  await createImage({ format: 'vhdx', filename: img, size: 16 * MiB, options: { logical_sector_size: '4096', physical_sector_size: '4096', block_size: '1M' } });
  const n = await openImage(img, { format: 'vhdx' });
  const ref = Buffer.alloc(16 * MiB);
  const r = rng(99);
  for (let i = 0; i < 20; i++) {
    const len = 1 + Math.floor(r() * 200000);
    const off = Math.floor(r() * (n.size - len));
    const b = Buffer.alloc(len, i + 1);
    await writeAt(n, b, off);
    b.copy(ref, off);
  }
  await n.close();
  // qemu 7.2 opens only 512-byte logical sectors ('Operation not supported')
  t.not(qemuImgStatus('info', '-f', 'vhdx', img).code, 0, 'qemu refuses 4096-byte logical sectors');
  t.equal(firstDiff(await ourView(img), ref), -1, 'we read it back after reopening');
  const rep = await checkImage(img, { format: 'vhdx' }, 'none');
  t.equal(rep.result!.corruptions, 0, 'our check is clean');
  const raw = path.join(dir, 's.raw');
  await convertImage({ src: img, srcOpen: {}, dst: raw, outFormat: 'raw' });
  t.equal(firstDiff(fs.readFileSync(raw), ref), -1, 'convert to raw');
});

t.test('convert both ways', async (t) => {
  const dir = tmpdir(t);
  const raw = path.join(dir, 'src.raw');
  const b = Buffer.alloc(10 * MiB);
  for (let i = 0; i < b.length; i += 65536) if ((i >> 16) % 7 === 2) b.fill((i >> 16) & 0xff, i, i + 65536);
  fs.writeFileSync(raw, b);
  for (const sub of ['dynamic', 'fixed']) {
    const v = path.join(dir, `c-${sub}.vhdx`);
    await convertImage({ src: raw, srcOpen: { format: 'raw' }, dst: v, outFormat: 'vhdx', outOptions: { subformat: sub } });
    t.equal(qemuImgStatus('check', v).code, 0, `${sub}: qemu-img check`);
    t.equal(firstDiff(qemuRaw(dir, v, ['-f', 'vhdx']), b), -1, `${sub}: qemu reads our convert`);
    const q = path.join(dir, `q-${sub}.vhdx`);
    qemuImg('convert', '-f', 'raw', '-O', 'vhdx', '-o', `subformat=${sub}`, raw, q);
    const back = path.join(dir, `back-${sub}.raw`);
    await convertImage({ src: q, srcOpen: {}, dst: back, outFormat: 'raw' });
    t.equal(firstDiff(fs.readFileSync(back), b), -1, `${sub}: we read qemu's convert`);
  }
});

/** writes `h` (with a bumped sequence number) into the inactive header slot */
function bumpHeader(buf: Buffer, edit: (h: NonNullable<ReturnType<typeof parseHeader>>) => void): void {
  const a = parseHeader(buf.subarray(HEADER1, HEADER1 + 4096))!;
  const b = parseHeader(buf.subarray(HEADER2, HEADER2 + 4096))!;
  const cur = a.seq >= b.seq ? a : b;
  const slot = a.seq >= b.seq ? HEADER2 : HEADER1;
  const h = { ...cur, seq: cur.seq + 1n };
  edit(h);
  serializeHeader(h).copy(buf, slot);
}

/** A dirty image: block 2 newly allocated at the end of the file, its BAT entry only in the log. */
function makeDirty(dir: string): { img: string; expect: Buffer } {
  const img = path.join(dir, 'dirty.vhdx');
  qemuImg('create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', img, '8M');
  qemuIo(img, ['write -P 0x21 0 64k'], ['-f', 'vhdx']);
  const expect = qemuRaw(dir, img, ['-f', 'vhdx']);
  let buf = fs.readFileSync(img);
  const batOffset = Number(buf.readBigUInt64LE(192 * 1024 + 16 + 16));
  const at = Math.ceil(buf.length / MiB) * MiB;
  const block = Buffer.alloc(MiB, 0xc3);
  buf = Buffer.concat([buf, Buffer.alloc(at - buf.length), block]);
  const sector = Buffer.from(buf.subarray(batOffset, batOffset + 4096));
  sector.writeUInt32LE((((at / MiB) << 20) | 6) >>> 0, 2 * 8);
  sector.writeUInt32LE(0, 2 * 8 + 4);
  const logGuid = newGuid();
  const cur = parseHeader(buf.subarray(HEADER1, HEADER1 + 4096))!;
  const entry = buildEntry([{ offset: batOffset, data: sector }], 7n, logGuid, buf.length);
  entry.copy(buf, cur.logOffset);
  bumpHeader(buf, (h) => { h.logGuid = logGuid; });
  fs.writeFileSync(img, buf);
  block.copy(expect, 2 * MiB);
  return { img, expect };
}

t.test('dirty log: replayed in memory read-only, on disk read-write', async (t) => {
  const dir = tmpdir(t);
  const { img, expect } = makeDirty(dir);
  const before = fs.readFileSync(img);
  const ro = qemuImgStatus('convert', '-f', 'vhdx', '-O', 'raw', img, path.join(dir, 'x.raw'));
  t.not(ro.code, 0, 'qemu refuses a read-only open of the dirty image (so it is dirty)');
  t.equal(firstDiff(await ourView(img, { format: 'vhdx' }), expect), -1, 'read-only view shows the replayed data');
  t.ok(fs.readFileSync(img).equals(before), 'read-only open leaves the file untouched');
  const rep = await checkImage(img, { format: 'vhdx' }, 'none');
  t.ok(rep.result!.corruptions > 0, 'check reports the pending log');
  // qemu's own replay on a copy gives the same guest data
  const copy = path.join(dir, 'copy.vhdx');
  fs.copyFileSync(img, copy);
  qemuImgStatus('check', '-r', 'all', '-f', 'vhdx', copy);
  t.equal(firstDiff(qemuRaw(dir, copy, ['-f', 'vhdx']), expect), -1, 'qemu replays to the same data');
  const n = await openImage(img, { format: 'vhdx' });
  await n.close();
  t.equal(qemuImgStatus('check', '-f', 'vhdx', img).code, 0, 'clean after our read-write replay');
  t.equal(firstDiff(qemuRaw(dir, img, ['-f', 'vhdx']), expect), -1, 'qemu reads the replayed image');
  const h = parseHeader(fs.readFileSync(img).subarray(HEADER1, HEADER1 + 4096))!;
  t.ok(h.logGuid.every((x) => x === 0), 'log guid cleared');
  // check -r all replays too
  const { img: img2 } = makeDirty(fs.mkdtempSync(path.join(dir, 'b')));
  const rep2 = await checkImage(img2, { format: 'vhdx' }, 'all');
  t.equal(rep2.result!.corruptionsFixed, 1, 'check -r all replays');
  t.equal(qemuImgStatus('check', '-f', 'vhdx', img2).code, 0, 'qemu agrees afterwards');
});

t.test('a log entry with a bad checksum or another guid is ignored', async (t) => {
  const dir = tmpdir(t);
  const { img } = makeDirty(dir);
  const buf = fs.readFileSync(img);
  const h = parseHeader(buf.subarray(HEADER1, HEADER1 + 4096))!;
  buf[h.logOffset + 100] ^= 0xff; // inside the entry: checksum no longer matches
  fs.writeFileSync(img, buf);
  const v = await ourView(img, { format: 'vhdx' });
  t.ok(v.subarray(2 * MiB, 3 * MiB).every((x) => x === 0), 'invalid entry not replayed');
});

t.test('a log zeroing terabytes past the end of the file is replayed without writing them', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'z.vhdx');
  qemuImg('create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', img, '8M');
  qemuIo(img, ['write -P 0x21 0 64k'], ['-f', 'vhdx']);
  const buf = fs.readFileSync(img);
  const size = buf.length;
  const logGuid = newGuid();
  const e = Buffer.alloc(4096);
  e.write('loge', 0, 'latin1');
  e.writeUInt32LE(4096, 8);
  e.writeBigUInt64LE(1n, 16);
  e.writeUInt32LE(1, 24);
  logGuid.copy(e, 32);
  e.writeBigUInt64LE(BigInt(size), 48);
  e.writeBigUInt64LE(BigInt(size), 56);
  e.write('zero', 64, 'latin1');
  e.writeBigUInt64LE(1n << 40n, 64 + 8);
  e.writeBigUInt64LE(BigInt(size), 64 + 16);
  e.writeBigUInt64LE(1n, 64 + 24);
  e.writeUInt32LE(checksum(e), 4);
  const h = parseHeader(buf.subarray(HEADER1, HEADER1 + 4096))!;
  e.copy(buf, h.logOffset);
  bumpHeader(buf, (x) => { x.logGuid = logGuid; });
  fs.writeFileSync(img, buf);
  const ref = qemuRaw(dir, base0(dir), ['-f', 'vhdx']);
  t.not(qemuImgStatus('info', '-f', 'vhdx', img).code, 0, 'qemu sees a valid log to replay');
  const rep = await checkImage(img, { format: 'vhdx' }, 'none');
  t.ok(rep.result!.corruptions > 0, 'we see it too');
  const n = await openImage(img, { format: 'vhdx' });
  await n.close();
  t.ok(fs.statSync(img).size <= size + MiB, 'file not grown by the zero descriptor');
  t.equal(qemuImgStatus('check', '-f', 'vhdx', img).code, 0, 'qemu-img check clean after replay');
  t.equal(firstDiff(qemuRaw(dir, img, ['-f', 'vhdx']), ref), -1, 'data unchanged');
});

function base0(dir: string): string {
  const f = path.join(dir, 'base0.vhdx');
  qemuImg('create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', f, '8M');
  qemuIo(f, ['write -P 0x21 0 64k'], ['-f', 'vhdx']);
  return f;
}

t.test('hostile images give kind image', async (t) => {
  const dir = tmpdir(t);
  const base = path.join(dir, 'base.vhdx');
  qemuImg('create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', base, '8M');
  qemuIo(base, ['write -P 1 0 4k'], ['-f', 'vhdx']);
  const good = fs.readFileSync(base);
  const rt = 192 * 1024;
  const fixRt = (b: Buffer): Buffer => { b.writeUInt32LE(checksum(b.subarray(rt, rt + 65536)), rt + 4); return b; };
  const metaOff = (b: Buffer): number => Number(b.readBigUInt64LE(rt + 48 + 16));
  const batOff = (b: Buffer): number => Number(b.readBigUInt64LE(rt + 16 + 16));
  const cases: Record<string, (b: Buffer) => Buffer> = {
    'both headers bad': (b) => { b[HEADER1 + 20] ^= 1; b[HEADER2 + 20] ^= 1; return b; },
    'region table checksum': (b) => { b[rt + 100] ^= 1; return b; },
    'region beyond EOF': (b) => { b.writeBigUInt64LE(1n << 50n, rt + 16 + 16); return fixRt(b); },
    'region entry count huge': (b) => { b.writeUInt32LE(100000, rt + 8); return fixRt(b); },
    'regions overlap': (b) => { b.writeBigUInt64LE(BigInt(metaOff(b)), rt + 16 + 16); return fixRt(b); },
    'block size 3 MiB': (b) => { b.writeUInt32LE(3 * MiB, metaOff(b) + 65536); return b; },
    'block size 0': (b) => { b.writeUInt32LE(0, metaOff(b) + 65536); return b; },
    'logical sector 1000': (b) => { b.writeUInt32LE(1000, metaOff(b) + 65536 + 32); return b; },
    'virtual size huge': (b) => { b.writeBigUInt64LE(1n << 60n, metaOff(b) + 65536 + 8); return b; },
    'metadata item out of bounds': (b) => { b.writeUInt32LE(0xfffffff0, metaOff(b) + 32 + 16); return b; },
    'metadata signature': (b) => { b[metaOff(b)] ^= 1; return b; },
    'BAT entry beyond EOF': (b) => { b.writeUInt32LE(((4000 << 20) | 6) >>> 0, batOff(b) + 8); return b; },
    'BAT entry inside the headers': (b) => { b.writeUInt32LE(6, batOff(b) + 8); return b; },
    'BAT entry bad state': (b) => { b.writeUInt32LE(4, batOff(b) + 8); return b; },
    'log beyond EOF': (b) => { bumpHeader(b, (h) => { h.logOffset = 1024 * MiB; }); return b; },
    'log offset unaligned': (b) => { bumpHeader(b, (h) => { h.logOffset = MiB + 4096; }); return b; },
    truncated: (b) => b.subarray(0, 2 * MiB),
    'no signature': (b) => { b.write('xxxx', 0, 'latin1'); return b; },
  };
  for (const [name, mut] of Object.entries(cases)) {
    const f = path.join(dir, `${name.replace(/ /g, '_')}.vhdx`);
    fs.writeFileSync(f, mut(Buffer.from(good)));
    const p = () => openImage(f, { format: 'vhdx', readOnly: true }).then((n) => n.close());
    t.equal(await errKind(p()), 'image', `${name}: ${await errMessage(p())}`);
  }
  // one bad header: the other one is used
  const one = path.join(dir, 'one.vhdx');
  const b = Buffer.from(good);
  b[HEADER1 + 20] ^= 1;
  fs.writeFileSync(one, b);
  t.equal(firstDiff(await ourView(one, { format: 'vhdx' }), qemuRaw(dir, base, ['-f', 'vhdx'])), -1, 'one bad header is survivable');
});
