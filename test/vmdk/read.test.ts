// Images qemu wrote read byte-identically here; info/map mirror qemu-img.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { blockStatusAt } from '../../lib/core/io';
import { imageInfo } from '../../lib/ops/info';
import { convertImage } from '../../lib/ops/convert';
import { firstDiff, hasQemu, ourRaw, qemuImg, qemuIo, qemuRaw, sh, SUBFORMATS, tmpdir, withImage, kindOf } from './helpers';

const writes = ['write -P 0xab 0 70k', 'write -P 0x11 100k 3k', 'write -P 0x22 1500k 5k', 'write -P 0x33 3000k 200k', 'write -P 0x44 6143k 1k'];

if (!hasQemu) t.test('vmdk read tests', { skip: 'qemu-img/qemu-io not installed' }, async () => undefined);
else {
  for (const sf of SUBFORMATS) {
    t.test(`read: qemu-made ${sf}`, async (t) => {
      const dir = tmpdir(t);
      const img = path.join(dir, 'a.vmdk');
      if (sf === 'streamOptimized') {
        const src = path.join(dir, 'src.raw');
        qemuImg('create', '-q', '-f', 'raw', src, '6M');
        qemuIo(src, 'raw', writes);
        qemuImg('convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', src, img);
      } else {
        qemuImg('create', '-q', '-f', 'vmdk', '-o', `subformat=${sf}`, img, '6M');
        qemuIo(img, 'vmdk', writes);
      }
      const ref = qemuRaw(img, dir);
      const ours = await ourRaw(img);
      t.equal(firstDiff(ours, ref), -1, 'guest bytes equal qemu-img convert -O raw');
      t.equal(ours[0], 0xab, 'data present');
      const [info] = await imageInfo(img, { format: 'vmdk' }, false);
      const q = JSON.parse(qemuImg('info', '--output', 'json', img));
      t.same(info['format-specific'], q['format-specific'], 'format-specific equals qemu-img info');
      t.equal(info['cluster-size'], q['cluster-size'], 'cluster-size');
      t.equal(info['virtual-size'], q['virtual-size'], 'virtual-size');
      // allocation: a hole in the middle is not data, the written head is
      await withImage(img, {}, async (n) => {
        const a = await blockStatusAt(n, 0, n.size);
        t.equal(a.state, 'data');
        if (!sf.endsWith('Flat')) {
          const h = await blockStatusAt(n, 2 << 20, 4096);
          t.equal(h.state, 'unallocated', 'hole');
          if (sf !== 'streamOptimized') t.ok(a.host && a.host.offset > 0 && !a.host.writable, 'host location, read-only');
          else t.notOk(a.host, 'compressed data has no host location');
        } else {
          t.ok(a.host && a.host.offset === 0 && a.length >= 64 << 10, 'flat: host offset 0, merged');
        }
      });
    });
  }

  t.test('read: twoGbMaxExtentFlat/Sparse with several extents', async (t) => {
    const dir = tmpdir(t);
    for (const sf of ['twoGbMaxExtentFlat', 'twoGbMaxExtentSparse']) {
      const img = path.join(dir, `${sf}.vmdk`);
      qemuImg('create', '-q', '-f', 'vmdk', '-o', `subformat=${sf}`, img, `${2048 + 3}M`);
      qemuIo(img, 'vmdk', ['write -P 0x55 2047M 2M', 'write -P 0x66 1M 4k', 'write -P 0x77 2050M 5k']);
      const out = path.join(dir, `${sf}.raw`);
      await convertImage({ src: img, srcOpen: { format: 'vmdk' }, dst: out, outFormat: 'raw' });
      t.equal(sh('qemu-img', ['compare', '-f', 'vmdk', '-F', 'raw', img, out], [0, 1]).code, 0, `${sf}: compare equal`);
      const [info] = await imageInfo(img, { format: 'vmdk' }, false);
      const ext = (info['format-specific'] as { data: { extents: unknown[] } }).data.extents;
      t.equal(ext.length, 2, 'two extents');
      const q = JSON.parse(qemuImg('info', '--output', 'json', img));
      t.equal(info['actual-size'], q['actual-size'], 'actual-size sums the extent files as qemu');
    }
  });

  t.test('read: backing chain with parentCID, zeroed grains', async (t) => {
    const dir = tmpdir(t);
    const base = path.join(dir, 'base.vmdk');
    const top = path.join(dir, 'top.vmdk');
    qemuImg('create', '-q', '-f', 'vmdk', base, '4M');
    qemuIo(base, 'vmdk', ['write -P 0x10 0 1M', 'write -P 0x20 2M 1M']);
    qemuImg('create', '-q', '-f', 'vmdk', '-o', 'zeroed_grain=on', '-b', 'base.vmdk', '-F', 'vmdk', top);
    qemuIo(top, 'vmdk', ['write -P 0x30 100k 10k', 'write -z 2M 128k']);
    const ref = qemuRaw(top, dir);
    const ours = await ourRaw(top);
    t.equal(firstDiff(ours, ref), -1, 'overlay reads like qemu');
    t.equal(ours[2 << 20], 0, 'zeroed grain reads zero over backing data');
    t.equal(ours[(2 << 20) + (128 << 10)], 0x20, 'backing shows through');
    await withImage(top, {}, async (n) => {
      t.equal((await blockStatusAt(n, 2 << 20, 4096)).state, 'zero', 'GTE 1 is a zero grain');
      t.equal((await blockStatusAt(n, 3 << 20, 4096)).state, 'unallocated');
    });
    const [info] = await imageInfo(top, { format: 'vmdk' }, false);
    const q = JSON.parse(qemuImg('info', '--output', 'json', top));
    t.equal(info['backing-filename'], q['backing-filename']);
    t.equal((info['format-specific'] as { data: Record<string, unknown> }).data['parent-cid'], q['format-specific'].data['parent-cid']);
    // a changed base CID makes the overlay's backing reads fail, as in qemu
    const desc = fs.readFileSync(base);
    const i = desc.indexOf('CID=');
    desc.write('CID=0badc0de', i, 'latin1');
    fs.writeFileSync(base, desc);
    t.equal(await kindOf(ourRaw(top)), 'image', 'parent CID mismatch refused');
  });

  t.test('read: descriptor with FLAT offset, VMFS and ZERO extents', async (t) => {
    const dir = tmpdir(t);
    const a = Buffer.alloc(1 << 20, 0x61);
    const b = Buffer.alloc(1 << 20, 0x62);
    fs.writeFileSync(path.join(dir, 'a.bin'), Buffer.concat([Buffer.alloc(4096, 0xee), a]));
    fs.writeFileSync(path.join(dir, 'b.bin'), b);
    fs.mkdirSync(path.join(dir, 'sub'));
    fs.copyFileSync(path.join(dir, 'b.bin'), path.join(dir, 'sub', 'c.bin'));
    const desc = '# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n# Extent description\n'
      + 'RW 2048 FLAT "a.bin" 8\nRW 1024 ZERO\nRDONLY 2048 VMFS "b.bin"\nRW 2048 FLAT "sub/c.bin" 0\n';
    const img = path.join(dir, 'd.vmdk');
    fs.writeFileSync(img, desc);
    const ours = await ourRaw(img);
    t.equal(ours.length, 7168 * 512);
    t.equal(firstDiff(ours.subarray(0, 1 << 20), a), -1, 'flat extent honours its start sector');
    t.ok(ours.subarray(1 << 20, (1 << 20) + (512 << 10)).every((x) => x === 0), 'ZERO extent');
    t.equal(ours[(3 << 19) + 5], 0x62, 'VMFS extent');
    t.equal(ours[ours.length - 1], 0x62, 'extent in a subdirectory');
    const ref = qemuRaw(img, dir); // qemu skips ZERO and RDONLY lines: compare only the first extent
    t.equal(firstDiff(ours.subarray(0, 1 << 20), ref.subarray(0, 1 << 20)), -1, 'first extent equals qemu');
  });
}
