// Our writes (random, unaligned) leave images that qemu-img check finds clean and that equal
// a reference; images we create pass qemu's check and read back in qemu; convert both ways.
import t, { Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { createImage } from '../../lib/ops/create';
import { convertImage } from '../../lib/ops/convert';
import { imageInfo } from '../../lib/ops/info';
import { checkImage } from '../../lib/ops/check';
import { firstDiff, hasQemu, kindOf, ourRaw, qemuImg, qemuIo, qemuRaw, randomWrites, sh, SUBFORMATS, tmpdir, withImage } from './helpers';
import { writeAt } from '../../lib/core/io';
import { tuning } from '../../lib/formats/vmdk/extent';

const SIZE = 6 << 20;

function qemuCheckClean(t: Test, img: string): void {
  const r = sh('qemu-img', ['check', '-f', 'vmdk', img], [0, 1, 2, 3]);
  t.equal(r.code, 0, `qemu-img check clean: ${r.out.trim().split('\n').pop()}`);
}

function compareRaw(t: Test, img: string, ref: string): void {
  const r = sh('qemu-img', ['compare', '-f', 'vmdk', '-F', 'raw', img, ref], [0, 1, 2]);
  t.equal(r.code, 0, `qemu-img compare: ${r.out.trim()}`);
}

if (!hasQemu) t.test('vmdk write tests', { skip: 'qemu-img/qemu-io not installed' }, async () => undefined);
else {
  for (const sf of SUBFORMATS) {
    t.test(`write: random unaligned writes into a qemu-made ${sf}`, async (t) => {
      const dir = tmpdir(t);
      const img = path.join(dir, 'a.vmdk');
      qemuImg('create', '-q', '-f', 'vmdk', '-o', `subformat=${sf}`, img, String(SIZE));
      const ref = Buffer.alloc(SIZE);
      const stream = sf === 'streamOptimized';
      if (!stream) { qemuIo(img, 'vmdk', ['write -P 0x5a 64k 64k']); ref.fill(0x5a, 64 << 10, 128 << 10); }
      await randomWrites(img, ref, 11, 30, stream);
      const refFile = path.join(dir, 'ref.raw');
      fs.writeFileSync(refFile, ref);
      qemuCheckClean(t, img);
      compareRaw(t, img, refFile);
      t.equal(firstDiff(await ourRaw(img), ref), -1, 'reads back here');
      const [info] = await imageInfo(img, { format: 'vmdk' }, false);
      const q = JSON.parse(qemuImg('info', '--output', 'json', img));
      t.equal((info['format-specific'] as { data: { cid: number } }).data.cid, q['format-specific'].data.cid, 'CID (changed by the first write) agrees');
    });

    t.test(`create: ${sf} made here passes qemu-img check and reads in qemu`, async (t) => {
      const dir = tmpdir(t);
      const img = path.join(dir, 'n.vmdk');
      await createImage({ format: 'vmdk', filename: img, size: SIZE, options: { subformat: sf } });
      qemuCheckClean(t, img);
      const q = JSON.parse(qemuImg('info', '--output', 'json', img));
      t.equal(q['virtual-size'], SIZE);
      t.equal(q['format-specific'].data['create-type'], sf, 'create type');
      const ref = Buffer.alloc(SIZE);
      await randomWrites(img, ref, 23, 25, sf === 'streamOptimized');
      const refFile = path.join(dir, 'ref.raw');
      fs.writeFileSync(refFile, ref);
      qemuCheckClean(t, img);
      compareRaw(t, img, refFile);
      t.equal(firstDiff(qemuRaw(img, dir), ref), -1, 'qemu reads our data');
      if (sf !== 'streamOptimized' && sf !== 'monolithicFlat' && sf !== 'twoGbMaxExtentFlat') {
        // qemu can keep writing into our images
        qemuIo(img, 'vmdk', ['write -P 0x77 4M 100k']);
        ref.fill(0x77, 4 << 20, (4 << 20) + (100 << 10));
        t.equal(firstDiff(await ourRaw(img), ref), -1, 'qemu writes read back here');
      }
      const r = await checkImage(img, { format: 'vmdk' }, 'none');
      t.equal(r.result?.corruptions, 0, 'our check is clean');
    });
  }

  t.test('create: options as qemu (adapter_type, hwversion, compat6, toolsversion, zeroed_grain)', async (t) => {
    const dir = tmpdir(t);
    const a = path.join(dir, 'a.vmdk');
    await createImage({ format: 'vmdk', filename: a, size: '1M', options: { adapter_type: 'lsilogic', hwversion: '7', toolsversion: '1234' } });
    const text = fs.readFileSync(a).subarray(512, 512 * 21).toString('latin1');
    t.match(text, /ddb.adapterType = "lsilogic"/);
    t.match(text, /ddb.geometry.heads = "255"/);
    t.match(text, /ddb.virtualHWVersion = "7"/);
    t.match(text, /ddb.toolsVersion = "1234"/);
    const b = path.join(dir, 'b.vmdk');
    const q = path.join(dir, 'q.vmdk');
    await createImage({ format: 'vmdk', filename: b, size: '3M', options: { compat6: 'on', zeroed_grain: 'on' } });
    qemuImg('create', '-q', '-f', 'vmdk', '-o', 'compat6=on,zeroed_grain=on', q, '3M');
    const hb = fs.readFileSync(b).subarray(0, 512);
    const hq = fs.readFileSync(q).subarray(0, 512);
    t.equal(firstDiff(hb, hq), -1, 'header identical to qemu-img create (redundant GD layout, version 2, zeroed-grain flag)');
    t.equal(fs.statSync(b).size, fs.statSync(q).size, 'same file size');
    t.match(fs.readFileSync(b).toString('latin1'), /virtualHWVersion = "6"/);
    t.equal(await kindOf(createImage({ format: 'vmdk', filename: path.join(dir, 'x.vmdk'), size: '1M', options: { compat6: 'on', hwversion: '7' } })), 'usage');
    t.equal(await kindOf(createImage({ format: 'vmdk', filename: path.join(dir, 'y.vmdk'), size: '1M', options: { subformat: 'monolithicFlat', zeroed_grain: 'on' } })), 'unsupported');
    // zero writes become GTE 1 with zeroed_grain
    await withImage(b, { readOnly: false }, async (n) => {
      await writeAt(n, Buffer.alloc(128 << 10, 9), 0);
      await n.writeZeroes!(0, 64 << 10);
      t.equal((await n.blockStatus(0, 4096)).state, 'zero');
    });
    qemuCheckClean(t, b);
    t.match(qemuIo(b, 'vmdk', ['read -P 0 0 64k', 'read -P 9 64k 64k']), /read 65536\/65536 bytes[\s\S]*read 65536\/65536/);
  });

  t.test('create: backing_file sets parentFileNameHint and parentCID; COW of partial grains', async (t) => {
    const dir = tmpdir(t);
    const base = path.join(dir, 'base.vmdk');
    const top = path.join(dir, 'top.vmdk');
    qemuImg('create', '-q', '-f', 'vmdk', base, '2M');
    qemuIo(base, 'vmdk', ['write -P 0x41 0 2M']);
    await createImage({ format: 'vmdk', filename: top, options: { backing_file: 'base.vmdk' } });
    const q = JSON.parse(qemuImg('info', '--output', 'json', top));
    const qb = JSON.parse(qemuImg('info', '--output', 'json', base));
    t.equal(q['virtual-size'], 2 << 20, 'size taken from the backing file');
    t.equal(q['backing-filename'], 'base.vmdk');
    t.equal(q['format-specific'].data['parent-cid'], qb['format-specific'].data.cid, 'parentCID is the base CID');
    await withImage(top, { readOnly: false }, async (n) => {
      await writeAt(n, Buffer.alloc(100, 0x42), 70000);
    });
    qemuCheckClean(t, top);
    const ref = Buffer.alloc(2 << 20, 0x41);
    ref.fill(0x42, 70000, 70100);
    t.equal(firstDiff(qemuRaw(top, dir), ref), -1, 'qemu reads the COWed grain');
    t.equal(await kindOf(createImage({ format: 'vmdk', filename: path.join(dir, 'f.vmdk'), options: { backing_file: 'base.vmdk', subformat: 'monolithicFlat' } })), 'unsupported');
  });

  t.test('convert: qcow2 -> every vmdk subformat -> qcow2', async (t) => {
    const dir = tmpdir(t);
    const src = path.join(dir, 's.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', src, '5M');
    qemuIo(src, 'qcow2', ['write -P 0x31 0 100k', 'write -P 0x32 1000k 7k', 'write -P 0x33 4M 1M']);
    for (const sf of SUBFORMATS) {
      const v = path.join(dir, `${sf}.vmdk`);
      await convertImage({ src, srcOpen: { format: 'qcow2' }, dst: v, outFormat: 'vmdk', outOptions: { subformat: sf } });
      qemuCheckClean(t, v);
      t.equal(sh('qemu-img', ['compare', '-f', 'qcow2', '-F', 'vmdk', src, v], [0, 1, 2]).code, 0, `${sf}: equal to the source`);
      const back = path.join(dir, `${sf}.qcow2`);
      await convertImage({ src: v, srcOpen: { format: 'vmdk' }, dst: back, outFormat: 'qcow2' });
      t.equal(sh('qemu-img', ['compare', src, back], [0, 1, 2]).code, 0, `${sf}: back to qcow2`);
      const qv = path.join(dir, `${sf}-q.vmdk`);
      qemuImg('convert', '-O', 'vmdk', '-o', `subformat=${sf}`, src, qv);
      const ours = path.join(dir, `${sf}-q.raw`);
      await convertImage({ src: qv, srcOpen: { format: 'vmdk' }, dst: ours, outFormat: 'raw' });
      t.equal(sh('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', src, ours], [0, 1, 2]).code, 0, `${sf}: qemu's convert output reads here`);
    }
    const so = fs.readFileSync(path.join(dir, 'streamOptimized.vmdk'));
    t.equal(so.readBigUInt64LE(56), 0xffffffffffffffffn, 'streamOptimized: grain directory at the end');
    t.equal(so.readUInt32BE(so.length - 1024), 0x4b444d56, 'footer before the end-of-stream marker');
    t.equal(so.readUInt32LE(so.length - 1536 + 12), 3, 'footer marker');
  });
}

if (hasQemu) {
  t.test('streamOptimized: a flushed image is complete before close; FUSE host locations', async (t) => {
    const dir = tmpdir(t);
    const img = path.join(dir, 's.vmdk');
    await createImage({ format: 'vmdk', filename: img, size: '2M', options: { subformat: 'streamOptimized' } });
    await withImage(img, { readOnly: false }, async (n) => {
      await writeAt(n, Buffer.alloc(100000, 0x21), 1000);
      await n.flush!();
      const raw = qemuRaw(img, dir);
      t.equal(raw[1000], 0x21, 'qemu reads the flushed grains');
      t.equal(raw[101000], 0, 'end of the write');
      await writeAt(n, Buffer.alloc(5000, 0x22), 200000);
      t.equal((await n.blockStatus(1000, 10)).host, undefined, 'compressed grains have no host location');
    });
    qemuCheckClean(t, img);
    const raw = qemuRaw(img, dir);
    t.equal(raw[200000], 0x22, 'later write present after close');
    const sp = path.join(dir, 'p.vmdk');
    await createImage({ format: 'vmdk', filename: sp, size: '2M' });
    await withImage(sp, { readOnly: false }, async (n) => {
      await writeAt(n, Buffer.alloc(70000, 1), 0);
      const e = await n.blockStatus(0, 2 << 20);
      t.ok(e.host && e.host.writable, 'allocated grains are writable in place');
      t.equal(e.length, 128 << 10, 'two contiguous grains merged');
    });
    await withImage(sp, {}, async (n) => {
      const e = await n.blockStatus(0, 2 << 20);
      t.ok(e.host && !e.host.writable, 'read-only node: not writable');
    });
  });
}

if (hasQemu) {
  t.test('concurrent writes across many grain tables (cache evictions) stay consistent', async (t) => {
    const dir = tmpdir(t);
    const img = path.join(dir, 'c.vmdk');
    const size = 1 << 30; // 32 grain tables, more than the cache keeps for small images
    await createImage({ format: 'vmdk', filename: img, size });
    const refFile = path.join(dir, 'ref.raw');
    fs.writeFileSync(refFile, Buffer.alloc(0));
    fs.truncateSync(refFile, size);
    const fd = fs.openSync(refFile, 'r+');
    const r = (await import('./helpers')).rng(5);
    const used = new Set<number>();
    tuning.gtCacheBytes = 4 * 2048; // four grain tables: constant evictions
    t.teardown(() => { tuning.gtCacheBytes = 4 << 20; });
    await withImage(img, { readOnly: false }, async (n) => {
      const jobs: Promise<void>[] = [];
      for (let i = 0; i < 300; i++) {
        const blk = r(size / 4096);
        const g = blk >> 4;
        if (used.has(g) || used.has(g - 1) || used.has(g + 1)) continue; // writes never share a grain: no ordering effects
        used.add(g);
        const b = Buffer.alloc(4096 + r(3000), 1 + r(255));
        const off = blk * 4096 + r(100);
        if (off + b.length > size) continue;
        fs.writeSync(fd, b, 0, b.length, off);
        jobs.push(writeAt(n, b, off));
      }
      await Promise.all(jobs);
    });
    fs.closeSync(fd);
    qemuCheckClean(t, img);
    compareRaw(t, img, refFile);
  });
}

if (hasQemu) {
  t.test('a missing grain table is allocated (and its redundant copy)', async (t) => {
    const dir = tmpdir(t);
    const img = path.join(dir, 'g.vmdk');
    qemuImg('create', '-q', '-f', 'vmdk', img, '64M');
    const b = fs.readFileSync(img);
    const rgd = Number(b.readBigUInt64LE(48)) * 512;
    const gd = Number(b.readBigUInt64LE(56)) * 512;
    b.writeUInt32LE(0, gd + 4);
    b.writeUInt32LE(0, rgd + 4);
    fs.writeFileSync(img, b);
    const ref = Buffer.alloc(64 << 20);
    await withImage(img, { readOnly: false }, async (n) => {
      const d = Buffer.alloc(70000, 0x4d);
      await writeAt(n, d, 40 << 20);
      d.copy(ref, 40 << 20);
    });
    const after = fs.readFileSync(img);
    t.not(after.readUInt32LE(gd + 4), 0, 'grain directory entry set');
    t.not(after.readUInt32LE(rgd + 4), 0, 'redundant grain directory entry set');
    t.not(after.readUInt32LE(gd + 4), after.readUInt32LE(rgd + 4), 'separate tables');
    qemuCheckClean(t, img);
    const refFile = path.join(dir, 'ref.raw');
    fs.writeFileSync(refFile, ref);
    compareRaw(t, img, refFile);
  });
}
