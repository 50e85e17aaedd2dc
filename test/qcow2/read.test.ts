import t from 'tap';
import path from 'node:path';
import { openImage } from '../../lib/core/graph';
import { blockStatusAt } from '../../lib/core/io';
import { firstDiff, ourView, qemuImg, qemuIo, qemuRaw, tmpdir } from './helpers';

const writes = ['write -P 0xab 1M 64k', 'write -P 0x11 100k 3k', 'write -P 0x22 1500k 5k', 'write -z 2M 128k', 'write -P 0x33 3000k 200k'];

const cases: { name: string; opts: string[]; post?: (dir: string, img: string) => string }[] = [
  { name: 'v3 64k', opts: [] },
  { name: 'v2 64k', opts: ['-o', 'compat=0.10'] },
  { name: 'cluster 512', opts: ['-o', 'cluster_size=512'] },
  { name: 'cluster 2M', opts: ['-o', 'cluster_size=2M'] },
  { name: 'extended_l2 16k', opts: ['-o', 'extended_l2=on,cluster_size=16k'] },
  { name: 'extended_l2 2M', opts: ['-o', 'extended_l2=on,cluster_size=2M'] },
  { name: 'refcount_bits=2', opts: ['-o', 'refcount_bits=2'] },
  {
    name: 'compressed (zlib)', opts: [], post: (dir, img) => {
      const c = path.join(dir, 'c.qcow2');
      qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4k', img, c);
      return c;
    },
  },
  {
    name: 'compressed (zstd)', opts: [], post: (dir, img) => {
      const c = path.join(dir, 'z.qcow2');
      qemuImg('convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd,cluster_size=8k', img, c);
      return c;
    },
  },
];

let haveZstd = true;
try { require.resolve('zstd-napi'); } catch { haveZstd = false; }

for (const c of cases) {
  if (c.name.includes('zstd') && !haveZstd) { t.test(`read: ${c.name}`, { skip: 'optional zstd-napi not installed' }, async () => undefined); continue; }
  t.test(`read: ${c.name}`, async (t) => {
    const dir = tmpdir(t);
    let img = path.join(dir, 'a.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', ...c.opts, img, '4M');
    qemuIo(img, writes);
    if (c.post) img = c.post(dir, img);
    const ref = qemuRaw(dir, img);
    const ours = await ourView(img);
    t.equal(firstDiff(ours, ref), -1, 'every byte equals qemu-img convert output');
  });
}

t.test('read: backing chain with relative names, zero clusters over data', async (t) => {
  const dir = tmpdir(t);
  qemuImg('create', '-q', '-f', 'qcow2', path.join(dir, 'base.qcow2'), '4M');
  qemuIo(path.join(dir, 'base.qcow2'), ['write -P 0x44 0 4M']);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', '-o', 'cluster_size=32k', path.join(dir, 'mid.qcow2'));
  qemuIo(path.join(dir, 'mid.qcow2'), ['write -P 0x55 100k 100k', 'write -z 1M 64k']);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', '-o', 'extended_l2=on', path.join(dir, 'top.qcow2'));
  qemuIo(path.join(dir, 'top.qcow2'), ['write -P 0x66 150k 3k', 'write -z 2M 8k']);
  const top = path.join(dir, 'top.qcow2');
  const ref = qemuRaw(dir, top);
  t.equal(firstDiff(await ourView(top), ref), -1, 'chain reads like qemu');
  const n = await openImage(top, { readOnly: true });
  t.teardown(() => n.close());
  const st = await blockStatusAt(n, 0, 64 << 10);
  t.equal(st.state, 'unallocated', 'top layer is unallocated at 0');
  const z = await blockStatusAt(n, 2 << 20, 8 << 10);
  t.equal(z.state, 'zero', 'zeroed subclusters report zero');
  const d = await blockStatusAt(n, 150 << 10, 2048);
  t.equal(d.state, 'data', 'written subcluster is data');
  t.ok(d.host && typeof d.host.fd === 'number', 'data extent carries a host location');
  t.equal(d.host?.writable, false, 'read-only open: not writable');
});

t.test('read: external data file', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'df.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${path.join(dir, 'df.raw')}`, img, '2M');
  qemuIo(img, ['write -P 0x77 0 64k', 'write -P 0x78 1M 70k']);
  t.equal(firstDiff(await ourView(img), qemuRaw(dir, img)), -1, 'data file image reads like qemu');
  const n = await openImage(img, {});
  t.teardown(() => n.close());
  const st = await blockStatusAt(n, 0, 2 << 20);
  t.equal(st.state, 'data');
  t.equal(st.host?.offset, 0, 'host offset 0 in the data file');
  t.equal(st.host?.writable, true, 'allocated, refcount 1, opened rw: writable');
  t.equal(st.length, 64 << 10, 'extent ends where the data ends');
  const st2 = await blockStatusAt(n, 1 << 20, 1 << 20);
  t.equal(st2.length, 128 << 10, 'host-contiguous clusters are merged into one extent');
});

t.test('read: merged extents for contiguous clusters', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'a.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', img, '4M');
  qemuIo(img, ['write -P 1 0 1M']);
  const n = await openImage(img, { readOnly: true });
  t.teardown(() => n.close());
  const st = await blockStatusAt(n, 0, 4 << 20);
  t.equal(st.state, 'data');
  t.equal(st.length, 1 << 20, '256 contiguous 4k clusters form one extent');
  const info = await n.formatSpecific!();
  const want = JSON.parse(qemuImg('info', '-U', '--output', 'json', img))['format-specific'];
  t.same(info, want, 'format-specific matches qemu-img info');
  const extra = await n.infoExtra!();
  t.equal(extra['cluster-size'], 4096);
  t.equal(extra['dirty-flag'], false);
});
