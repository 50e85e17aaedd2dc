import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { openImage } from '../../lib/core/graph';
import { readAt, writeAt } from '../../lib/core/io';
import type { CreateContext } from '../../lib/core/node';
import { parseOptionString } from '../../lib/core/options';
import { SecretStore } from '../../lib/core/secrets';
import { qcow2Driver } from '../../lib/formats/qcow2';
import { errKind, firstDiff, qemuImg, qemuImgStatus, qemuIo, qemuRaw, tmpdir } from './helpers';

function ctx(filename: string, size: number | null, opts: string): CreateContext {
  return {
    options: opts ? parseOptionString(opts) : {},
    secrets: new SecretStore(),
    size,
    filename,
    open: (f, fmt) => openImage(f, { format: fmt, readOnly: true }),
  };
}

const variants: [string, number, string][] = [
  ['default', 4 << 20, ''],
  ['compat=0.10', 4 << 20, 'compat=0.10'],
  ['cluster 512, refcount 1', 3 << 20, 'cluster_size=512,refcount_bits=1'],
  ['cluster 2M, refcount 64', 5 << 20, 'cluster_size=2M,refcount_bits=64'],
  ['extended_l2', 4 << 20, 'extended_l2=on,cluster_size=32k'],
  ['lazy_refcounts', 4 << 20, 'lazy_refcounts=on'],
  ['preallocation=metadata', 2 << 20, 'preallocation=metadata'],
  ['preallocation=full', 1 << 20, 'preallocation=full,cluster_size=4k'],
  ['compression_type=zstd', 1 << 20, 'compression_type=zstd'],
  ['data_file', 2 << 20, 'data_file=DIR/d.raw'],
  ['data_file_raw', 2 << 20, 'data_file=DIR/d.raw,data_file_raw=on'],
  ['L1 of many clusters', 64 << 20, 'cluster_size=512'],
];

for (const [name, size, opts] of variants) {
  t.test(`create: ${name}`, async (t) => {
    const dir = tmpdir(t);
    const img = path.join(dir, 'new.qcow2');
    await qcow2Driver.create!(ctx(img, size, opts.replace(/DIR/g, dir)));
    const chk = qemuImgStatus('check', img);
    t.equal(chk.code, 0, `qemu-img check: ${chk.out}${chk.err}`);
    const info = JSON.parse(qemuImg('info', '--output', 'json', img));
    t.equal(info['virtual-size'], size, 'virtual size');
    // qemu writes, we read
    qemuIo(img, ['write -P 0x3c 4k 70k', `write -P 0x3d ${size - 8192} 8k`]);
    const ref = qemuRaw(dir, img);
    const n = await openImage(img, {});
    const got = Buffer.alloc(Math.min(size, 1 << 20));
    await readAt(n, got, 0);
    t.equal(firstDiff(got, ref.subarray(0, got.length)), -1, 'we read what qemu wrote');
    t.same(await n.formatSpecific!(), info['format-specific'], 'format-specific matches qemu-img info');
    // we write, qemu reads
    const b = Buffer.alloc(3000, 0x99);
    await writeAt(n, b, 100000);
    b.copy(ref, 100000);
    await n.close();
    t.equal(firstDiff(qemuRaw(dir, img), ref), -1, 'qemu reads what we wrote');
    t.equal(qemuImgStatus('check', img).code, 0, 'still clean after our write');
  });
}

t.test('create: backing file without size takes its size; relative name', async (t) => {
  const dir = tmpdir(t);
  const base = path.join(dir, 'base.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', base, '3M');
  qemuIo(base, ['write -P 0x12 0 3M']);
  const top = path.join(dir, 'top.qcow2');
  await qcow2Driver.create!(ctx(top, null, 'backing_file=base.qcow2,backing_fmt=qcow2'));
  const info = JSON.parse(qemuImg('info', '--output', 'json', top));
  t.equal(info['virtual-size'], 3 << 20);
  t.equal(info['backing-filename'], 'base.qcow2');
  t.equal(info['backing-filename-format'], 'qcow2');
  const n = await openImage(top, { readOnly: true });
  const extra = await n.infoExtra!();
  t.equal(extra['backing-filename'], info['backing-filename']);
  t.equal(extra['full-backing-filename'], info['full-backing-filename']);
  await n.close();
  const cmp = qemuImgStatus('compare', top, base);
  t.equal(cmp.code, 0, 'overlay equals its base');
});

t.test('create: invalid options fail and leave no file', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'bad.qcow2');
  t.equal(await errKind(qcow2Driver.create!(ctx(img, 1 << 20, 'cluster_size=1000'))), 'usage');
  t.equal(await errKind(qcow2Driver.create!(ctx(img, 1 << 20, 'compat=0.10,refcount_bits=8'))), 'usage');
  t.equal(await errKind(qcow2Driver.create!(ctx(img, 1 << 20, 'extended_l2=on,cluster_size=4k'))), 'usage');
  t.equal(await errKind(qcow2Driver.create!(ctx(img, null, ''))), 'usage');
  t.notOk(fs.existsSync(img), 'no half-written file');
});
