import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { openImage } from '../../lib/core/graph';
import { readAt } from '../../lib/core/io';
import { errKind, errMessage, qemuImg, qemuIo, tmpdir } from './helpers';

function patch(img: string, at: number, bytes: Buffer): void {
  const fd = fs.openSync(img, 'r+');
  fs.writeSync(fd, bytes, 0, bytes.length, at);
  fs.closeSync(fd);
}
const be32 = (v: number): Buffer => { const b = Buffer.alloc(4); b.writeUInt32BE(v >>> 0, 0); return b; };
const be64 = (v: bigint): Buffer => { const b = Buffer.alloc(8); b.writeBigUInt64BE(v, 0); return b; };

async function readEverything(img: string): Promise<void> {
  const n = await openImage(img, { format: 'qcow2', readOnly: true });
  try {
    const b = Buffer.alloc(n.size);
    await readAt(n, b, 0);
  } finally {
    await n.close();
  }
}

t.test('hostile headers give one-line image errors', async (t) => {
  const dir = tmpdir(t);
  const good = path.join(dir, 'good.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', good, '1M');
  qemuIo(good, ['write -P 1 0 128k']);
  const mk = (name: string, at: number, bytes: Buffer): string => {
    const f = path.join(dir, name);
    fs.copyFileSync(good, f);
    patch(f, at, bytes);
    return f;
  };
  const junk = path.join(dir, 'junk.qcow2');
  fs.writeFileSync(junk, Buffer.alloc(8192, 0x41));
  t.equal(await errMessage(openImage(junk, { format: 'qcow2', readOnly: true })), 'Image is not in qcow2 format');
  t.equal(await errKind(openImage(junk, { format: 'qcow2', readOnly: true })), 'image');

  const cases: [string, string, number, Buffer, RegExp][] = [
    ['version', 'v9.qcow2', 4, be32(9), /Unsupported qcow2 version 9/],
    ['cluster bits', 'cb.qcow2', 20, be32(31), /Unsupported cluster size/],
    ['L1 too large', 'l1.qcow2', 36, be32(0x10000000), /L1 table too large/],
    ['L1 too small', 'l1s.qcow2', 24, be64(1n << 50n), /L1 table is too small|too big/],
    ['L1 beyond file', 'l1b.qcow2', 36, be32(1 << 20), /beyond the end of the file/],
    ['L1 unaligned', 'l1u.qcow2', 40, be64(0x30001n), /Invalid L1 table offset/],
    ['reftable too large', 'rt.qcow2', 56, be32(0x7fffffff), /Reference count table too large/],
    ['header length', 'hl.qcow2', 100, be32(1 << 20), /header exceeds cluster size/],
    ['refcount order', 'ro.qcow2', 96, be32(7), /Reference count entry width too large/],
    ['backing name too long', 'bn.qcow2', 8, Buffer.concat([be64(512n), be32(5000)]), /Backing file name too long/],
    ['too many snapshots', 'sn.qcow2', 60, be32(0x7fffffff), /Too many snapshots/],
    ['encryption method', 'cm.qcow2', 32, be32(9), /Unsupported encryption method/],
    ['extension length', 'ext.qcow2', 112 + 4, be32(0xfffffff0), /Header extension too large/],
  ];
  for (const [what, name, at, bytes, re] of cases) {
    const f = mk(name, at, bytes);
    const msg = await errMessage(openImage(f, { format: 'qcow2', readOnly: true }));
    t.match(msg, re, what);
    t.equal(await errKind(openImage(f, { format: 'qcow2', readOnly: true })), 'image', `${what}: kind image`);
  }

  // unknown incompatible feature, named from the feature table
  const unk = mk('unk.qcow2', 72, be64(1n << 5n));
  // qemu's feature table entry for bit 4 renamed to bit 5 would be contrived; an unnamed bit is reported by number
  t.match(await errMessage(openImage(unk, { format: 'qcow2', readOnly: true })), /Unsupported qcow2 feature\(s\): Unknown incompatible feature: 20/);
  const named = mk('named.qcow2', 72, be64(1n << 4n));
  // bit 4 (extended L2) with 64k clusters is known: it opens, but L2 tables are read as extended
  t.equal(await errKind(readEverything(named)), 'none', 'known feature bit accepted');

  // truncated file
  const trunc = path.join(dir, 'trunc.qcow2');
  fs.writeFileSync(trunc, fs.readFileSync(good).subarray(0, 100));
  t.equal(await errKind(openImage(trunc, { format: 'qcow2', readOnly: true })), 'image', 'truncated header');
  const trunc2 = path.join(dir, 'trunc2.qcow2');
  fs.writeFileSync(trunc2, fs.readFileSync(good).subarray(0, 65536 * 2));
  t.equal(await errKind(openImage(trunc2, { format: 'qcow2', readOnly: true })), 'image', 'truncated tables');
});

t.test('corrupt bit: read-only works, read-write is refused', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'c.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', img, '1M');
  patch(img, 72, be64(2n));
  t.match(await errMessage(openImage(img, {})), /corrupt/);
  const n = await openImage(img, { readOnly: true });
  t.equal(n.size, 1 << 20, 'opens read-only');
  await n.close();
});

t.test('corrupt tables give errors, not crashes', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'a.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', img, '1M');
  qemuIo(img, ['write -P 1 0 64k']);
  const h = fs.readFileSync(img);
  const l1 = Number(h.readBigUInt64BE(40));
  // unaligned L2 offset in L1[0]
  const bad = path.join(dir, 'bad.qcow2');
  fs.copyFileSync(img, bad);
  patch(bad, l1, be64((1n << 63n) | 0x12345n));
  t.equal(await errKind(readEverything(bad)), 'image', 'unaligned L2 table offset');
  // unaligned data cluster offset
  const l2 = Number(h.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
  const bad2 = path.join(dir, 'bad2.qcow2');
  fs.copyFileSync(img, bad2);
  patch(bad2, l2, be64((1n << 63n) | 0x10200n));
  t.equal(await errKind(readEverything(bad2)), 'image', 'unaligned data cluster offset');
  // garbage compressed cluster
  const bad3 = path.join(dir, 'bad3.qcow2');
  fs.copyFileSync(img, bad3);
  patch(bad3, l2, be64((1n << 62n) | 0x30000n));
  t.equal(await errKind(readEverything(bad3)), 'image', 'undecodable compressed cluster');
  // huge offset field
  const bad4 = path.join(dir, 'bad4.qcow2');
  fs.copyFileSync(img, bad4);
  patch(bad4, l2, be64((1n << 63n) | 0x00ff000000000000n));
  t.equal(await errKind(readEverything(bad4)), 'image', 'offset beyond what we can address is an image error');
});
