import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { openImage } from '../../lib/core/graph';
import { ImgError } from '../../lib/core/errors';
import { imageInfo } from '../../lib/ops/info';
import { convertImage } from '../../lib/ops/convert';
import { IMAGES, have, openAndRead, ourView, patch, qemuRaw, readAll, run, sha256, tmpdir } from './helpers';

const SAMPLE = path.join(IMAGES, 'cloop-32k.cloop');
const SAMPLE_SHA = '11bba31e2c0e34fdd3680c671da0a7bc7fc231c29631b5c5e00a5023e6bb9cf8';
const be32 = (v: number): Buffer => { const b = Buffer.alloc(4); b.writeUInt32BE(v >>> 0); return b; };
const be64 = (v: number): Buffer => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(v)); return b; };

function input(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  const r = crypto.createHash('sha256').update(String(seed)).digest();
  for (let o = 0; o < len; o += 4096) {
    if ((o >> 12) % 3 === 0) crypto.createHash('sha256').update(r).update(String(o)).digest().copy(b, o);
    else b.fill((o >> 12) & 0xff, o, Math.min(len, o + 2000));
  }
  return b;
}

t.test('the sample reads as qemu reads it, probed by its header', async (t) => {
  const dir = tmpdir(t);
  const n = await openImage(SAMPLE, { readOnly: true });
  t.equal(n.driver, 'cloop', 'probed');
  const b = await readAll(n);
  await n.close();
  t.equal(sha256(b), SAMPLE_SHA);
  t.ok(b.equals(qemuRaw(dir, SAMPLE, 'cloop')), 'equal to qemu-img convert');
  const theirs = JSON.parse(run('qemu-img', ['info', '--output', 'json', SAMPLE]));
  const [ours] = await imageInfo(SAMPLE, {}, false);
  t.same(JSON.parse(JSON.stringify(ours)), theirs, 'info JSON');
});

t.test('create_compressed_fs images at several block sizes', { skip: have('create_compressed_fs') ? false : 'create_compressed_fs (cloop-utils) not installed' }, async (t) => {
  const dir = tmpdir(t);
  for (const [bs, len] of [[512, 20000], [16384, 300000], [65536, 200001], [262144, 600000]]) {
    const src = path.join(dir, `in-${bs}.img`);
    const img = path.join(dir, `out-${bs}.cloop`);
    const data = input(len, bs);
    fs.writeFileSync(src, data);
    run('create_compressed_fs', ['-q', '-B', String(bs), src, img]);
    const ours = await ourView(img, 'cloop');
    t.ok(ours.equals(qemuRaw(dir, img, 'cloop')), `block size ${bs}: equal to qemu-img`);
    t.ok(ours.subarray(0, len).equals(data), `block size ${bs}: holds the input`);
    t.equal(ours.length, Math.ceil(len / bs) * bs, `block size ${bs}: size`);
  }
});

t.test('convert out of cloop; always read-only', async (t) => {
  const dir = tmpdir(t);
  const out = path.join(dir, 'x.qcow2');
  await convertImage({ src: SAMPLE, srcOpen: {}, dst: out, outFormat: 'qcow2' });
  run('qemu-img', ['check', out]);
  t.equal(sha256(qemuRaw(dir, out, 'qcow2')), SAMPLE_SHA, 'qemu reads the converted image');
  const copy = path.join(dir, 'c.cloop');
  fs.copyFileSync(SAMPLE, copy);
  const n = await openImage(copy, { readOnly: false });
  t.equal(n.readOnly, true);
  t.equal(n.write, undefined);
  await readAll(n);
  await n.close();
  t.equal(sha256(fs.readFileSync(copy)), sha256(fs.readFileSync(SAMPLE)), 'file unchanged');
});

t.test('hostile images give one-line image errors', async (t) => {
  const dir = tmpdir(t);
  const good = fs.readFileSync(SAMPLE);
  const n = good.readUInt32BE(132);
  const tableEnd = 136 + 8 * (n + 1);
  let i = 0;
  const mk = (edit: (f: string) => void, base: Buffer = good): string => {
    const f = path.join(dir, `h${i++}.cloop`);
    fs.writeFileSync(f, base);
    edit(f);
    return f;
  };
  const check = async (what: string, f: string, re: RegExp): Promise<void> => {
    const e = await openAndRead(f, 'cloop');
    t.ok(e instanceof ImgError, `${what}: ImgError (${String(e)})`);
    if (e instanceof ImgError) {
      t.equal(e.kind, 'image', `${what}: kind`);
      t.notOk(e.message.includes('\n'), `${what}: one line`);
      t.match(e.message, re, `${what}: message`);
    }
  };
  await check('not cloop', mk((f) => patch(f, 0, Buffer.from('#!/bin/bash\n'))), /V2.0/);
  await check('too short', mk(() => undefined, good.subarray(0, 100)), /too short/);
  await check('block size 0', mk((f) => patch(f, 128, be32(0))), /cannot be zero/);
  await check('block size not sector multiple', mk((f) => patch(f, 128, be32(1000))), /multiple of 512/);
  await check('block size too big', mk((f) => patch(f, 128, be32(128 << 20))), /MB or less/);
  await check('huge block count', mk((f) => patch(f, 132, be32(0xfffffff0))), /too many offsets|beyond the end/);
  await check('table beyond file', mk((f) => patch(f, 132, be32(n + 100000))), /beyond the end/);
  await check('not monotonic', mk((f) => patch(f, 136 + 16, be64(good.readUInt32BE(136 + 4) - 1))), /monotonic/);
  await check('offset beyond file', mk((f) => patch(f, 136 + 8 * n, be64(good.length + 1))), /beyond the end/);
  await check('first block inside the table', mk((f) => patch(f, 136, be64(tableEnd - 8))), /overlaps/);
  // one block claiming 200000 stored bytes for a 32 KiB block: more than zlib can ever need
  const big = Buffer.alloc(tableEnd + 200000);
  good.copy(big, 0, 0, 136);
  big.writeUInt32BE(1, 132);
  big.writeBigUInt64BE(BigInt(136 + 16), 136);
  big.writeBigUInt64BE(BigInt(136 + 16 + 200000), 144);
  await check('compressed block too large', mk(() => undefined, big.subarray(0, 136 + 16 + 200000)), /compressed block size/);
  await check('corrupt block data', mk((f) => patch(f, Number(good.readBigUInt64BE(136)) + 2, Buffer.alloc(64, 0xee))), /block 0/);
  // block size doubled: every block now decompresses short
  await check('short block', mk((f) => patch(f, 128, be32(2 * good.readUInt32BE(128)))), /decompressed to/);
});
