import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import type { OpenContext } from '../../lib/core/node';
import { SecretStore } from '../../lib/core/secrets';
import { qcow2Driver } from '../../lib/formats/qcow2';
import { FileNode } from '../../lib/protocols/file';
import { qemuImg, qemuImgStatus, qemuIo, tmpdir } from './helpers';

function octx(filename: string, readOnly: boolean): OpenContext {
  return {
    options: {}, readOnly, secrets: new SecretStore(), filename,
    probed: false,
    openBacking: async () => null,
    openChild: async () => { throw new Error('no children in this test'); },
  };
}

async function runCheck(img: string, repair: 'none' | 'leaks' | 'all') {
  const file = FileNode.open({ filename: img, readOnly: repair === 'none', direct: false, noFlush: false, writethrough: false, locking: 'auto', shareRw: false });
  try {
    return await qcow2Driver.check!(file, octx(img, repair === 'none'), repair);
  } finally {
    await file.close();
  }
}

/** sets the 16-bit refcount of `cluster` by editing the first refcount block */
function pokeRefcount(img: string, cluster: number, v: number): void {
  const fd = fs.openSync(img, 'r+');
  try {
    const h = Buffer.alloc(64);
    fs.readSync(fd, h, 0, 64, 0);
    const rt = Number(h.readBigUInt64BE(48));
    const e = Buffer.alloc(8);
    fs.readSync(fd, e, 0, 8, rt);
    const rb = Number(e.readBigUInt64BE(0));
    const b = Buffer.alloc(2);
    b.writeUInt16BE(v, 0);
    fs.writeSync(fd, b, 0, 2, rb + cluster * 2);
  } finally {
    fs.closeSync(fd);
  }
}

t.test('check: clean image agrees with qemu-img check', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'a.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', img, '4M');
  qemuIo(img, ['write -P 1 0 100k', 'write -P 2 1M 64k']);
  qemuImg('snapshot', '-c', 's1', img);
  qemuIo(img, ['write -P 3 0 64k']);
  const r = await runCheck(img, 'none');
  const q = JSON.parse(qemuImg('check', '--output', 'json', img));
  t.equal(r.corruptions, 0);
  t.equal(r.leaks, 0);
  t.equal(r.imageEndOffset, q['image-end-offset'], 'image end offset');
  t.equal(r.allocatedClusters, q['allocated-clusters'], 'allocated clusters');
  t.equal(r.totalClusters, q['total-clusters'], 'total clusters');
  t.equal(r.fragmentedClusters, q['fragmented-clusters'], 'fragmented clusters');
});

t.test('check: leaked clusters are reported and repaired with -r leaks', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'a.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', img, '4M');
  qemuIo(img, ['write -P 1 0 100k']);
  const size = fs.statSync(img).size;
  const end = Math.ceil(size / 65536) * 65536;
  fs.truncateSync(img, end + 2 * 65536);
  pokeRefcount(img, end / 65536, 1);
  pokeRefcount(img, end / 65536 + 1, 1);
  t.equal(qemuImgStatus('check', img).code, 3, 'qemu-img sees leaks (exit 3)');
  const r = await runCheck(img, 'none');
  t.equal(r.leaks, 2, 'two leaked clusters');
  t.equal(r.corruptions, 0);
  const fixed = await runCheck(img, 'leaks');
  t.equal(fixed.leaksFixed, 2, 'both repaired');
  t.equal(fixed.leaks, 0, 'none left after the double check');
  t.equal(qemuImgStatus('check', img).code, 0, 'qemu-img check clean after repair');
});

t.test('check: refcount too low is a corruption, repaired with -r all', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'a.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', img, '4M');
  qemuIo(img, ['write -P 1 0 64k']);
  // the data cluster is the last one qemu allocated
  const last = Math.ceil(fs.statSync(img).size / 65536) - 1;
  pokeRefcount(img, last, 0);
  t.equal(qemuImgStatus('check', img).code, 2, 'qemu-img sees corruption (exit 2)');
  const r = await runCheck(img, 'none');
  t.ok(r.corruptions >= 1, `corruptions reported (${r.corruptions})`);
  const leaksOnly = await runCheck(img, 'leaks');
  t.ok(leaksOnly.corruptions >= 1, '-r leaks does not fix corruptions');
  const fixed = await runCheck(img, 'all');
  t.ok(fixed.corruptionsFixed >= 1, 'repaired');
  t.equal(fixed.corruptions, 0);
  t.equal(qemuImgStatus('check', img).code, 0, 'qemu-img check clean after repair');
});
