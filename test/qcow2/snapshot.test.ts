import t from 'tap';
import path from 'node:path';
import { openImage } from '../../lib/core/graph';
import { readAt, writeAt } from '../../lib/core/io';
import { firstDiff, qemuImg, qemuImgStatus, qemuIo, qemuRaw, tmpdir } from './helpers';

t.test('snapshots: create, list, read, apply, delete, interoperable with qemu-img', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'a.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=16k', img, '2M');
  qemuIo(img, ['write -P 0x01 0 300k']);
  qemuImg('snapshot', '-c', 'qemu-snap', img);
  qemuIo(img, ['write -P 0x02 100k 50k']);
  const stateQemuSnap = qemuRaw(dir, img, ['-l', 'snapshot.name=qemu-snap']);
  const stateBefore = qemuRaw(dir, img);

  let n = await openImage(img, {});
  const list = await n.snapshots!();
  t.same(list.map((s) => [s.id, s.name]), [['1', 'qemu-snap']], 'lists qemu snapshot');
  await n.snapshotCreate!('ours');
  const b = Buffer.alloc(20000, 0x03);
  await writeAt(n, b, 120 * 1024 + 5);
  const after = Buffer.from(stateBefore);
  b.copy(after, 120 * 1024 + 5);
  // read a snapshot through openSnapshot
  const sv = await n.openSnapshot!('qemu-snap');
  const got = Buffer.alloc(sv.size);
  await readAt(sv, got, 0);
  t.equal(firstDiff(got, stateQemuSnap), -1, 'openSnapshot shows the snapshot disk');
  await sv.close();
  await n.close();

  t.equal(qemuImgStatus('check', img).code, 0, 'clean after snapshot create + COW write');
  const qlist = qemuImg('snapshot', '-l', img);
  t.match(qlist, /ours/, 'qemu-img lists our snapshot');
  t.equal(firstDiff(qemuRaw(dir, img, ['-l', 'snapshot.name=ours']), stateBefore), -1, 'our snapshot holds the pre-write state (qemu view)');
  t.equal(firstDiff(qemuRaw(dir, img), after), -1, 'active layer has the new data');

  n = await openImage(img, {});
  await n.snapshotApply!('qemu-snap');
  await n.close();
  t.equal(qemuImgStatus('check', img).code, 0, 'clean after apply');
  t.equal(firstDiff(qemuRaw(dir, img), stateQemuSnap), -1, 'apply reverts to the snapshot');

  n = await openImage(img, {});
  await n.snapshotDelete!('qemu-snap');
  await n.snapshotDelete!('ours');
  t.same(await n.snapshots!(), [], 'all deleted');
  await n.close();
  const chk = qemuImgStatus('check', img);
  t.equal(chk.code, 0, `clean after delete: ${chk.out}`);
  t.equal(firstDiff(qemuRaw(dir, img), stateQemuSnap), -1, 'data kept after deleting snapshots');

  // qemu can still apply/delete what we made
  n = await openImage(img, {});
  await n.snapshotCreate!('again');
  await n.close();
  qemuIo(img, ['write -P 0x09 0 64k']);
  qemuImg('snapshot', '-a', 'again', img);
  t.equal(firstDiff(qemuRaw(dir, img), stateQemuSnap), -1, 'qemu-img snapshot -a of our snapshot');
  qemuImg('snapshot', '-d', 'again', img);
  t.equal(qemuImgStatus('check', img).code, 0, 'clean after qemu deletes our snapshot');
});

t.test('makeEmpty and setBacking', async (t) => {
  const dir = tmpdir(t);
  const base = path.join(dir, 'base.qcow2');
  const top = path.join(dir, 'top.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', base, '1M');
  qemuIo(base, ['write -P 0x21 0 1M']);
  qemuImg('create', '-q', '-f', 'qcow2', top, '1M');
  qemuIo(top, ['write -P 0x22 0 100k']);
  const n = await openImage(top, {});
  await n.makeEmpty!();
  await n.setBacking!('base.qcow2', 'qcow2');
  await n.close();
  t.equal(qemuImgStatus('check', top).code, 0, 'clean');
  const info = JSON.parse(qemuImg('info', '--output', 'json', top));
  t.equal(info['backing-filename'], 'base.qcow2');
  t.equal(info['backing-filename-format'], 'qcow2');
  t.equal(qemuImgStatus('compare', top, base).code, 0, 'empty overlay shows the new backing file');
});
