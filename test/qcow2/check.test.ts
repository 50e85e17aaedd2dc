import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import type { OpenContext } from '../../lib/core/node';
import { SecretStore } from '../../lib/core/secrets';
import { qcow2Driver } from '../../lib/formats/qcow2';
import { FileNode } from '../../lib/protocols/file';
import { qemuImg, qemuImgStatus, qemuIo, tmpdir } from './helpers';
import { imgmount, run } from '../helpers';

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

t.test('check -r: the report after the repair is the double check, as qemu-img prints it', async (t) => {
  const dir = tmpdir(t);
  const made = (name: string): string => {
    const f = path.join(dir, name);
    qemuImg('create', '-q', '-f', 'qcow2', f, '4M');
    qemuIo(f, ['write -P 1 0 200k']);
    return f;
  };
  // leaks only: refcount 2 on a used data cluster
  const leaky = made('leaky.qcow2');
  const last = Math.ceil(fs.statSync(leaky).size / 65536) - 1;
  pokeRefcount(leaky, last - 1, 2);
  // a leak and a corruption (refcount 0 on another used cluster): qemu rebuilds the refcount
  // structures (so its image end offset differs); we repair them in place. Without 'all',
  // qemu gives up ("need to rebuild refcount structures"); we repair the leak and report the
  // corruption.
  const both = made('both.qcow2');
  pokeRefcount(both, last - 1, 2);
  pokeRefcount(both, last, 0);
  const cases: [string, string, boolean][] = [[leaky, 'leaks', true], [leaky, 'all', true], [both, 'all', false]];
  for (const [base, mode, exactEnd] of cases) {
    for (const out of [[], ['--output', 'json']]) {
      const theirs = path.join(dir, `q-${path.basename(base)}-${mode}-${out.length}.qcow2`);
      const ours = path.join(dir, `o-${path.basename(base)}-${mode}-${out.length}.qcow2`);
      fs.copyFileSync(base, theirs);
      fs.copyFileSync(base, ours);
      const q = run('qemu-img', ['check', '-r', mode, ...out, theirs]);
      const o = imgmount(['check', '-r', mode, ...out, ours]);
      const what = `${path.basename(base)} -r ${mode} ${out.join(' ')}`;
      const norm = (x: string, f: string): string => {
        const y = x.split(f).join('IMG');
        return exactEnd ? y : y.replace(/("image-end-offset": |Image end offset: )\d+/, '$1N');
      };
      t.equal(o.code, q.code, `${what}: exit ${q.code} as qemu-img`);
      t.equal(norm(o.stdout, ours), norm(q.stdout, theirs), `${what}: stdout as qemu-img's`);
      t.match(o.stderr, /Repairing cluster/, `${what}: the repairs are on stderr`);
    }
  }
  const lo = path.join(dir, 'both-leaks.qcow2');
  fs.copyFileSync(both, lo);
  const r = imgmount(['check', '-r', 'leaks', lo]);
  t.equal(r.code, 2, 'both, -r leaks: the leak is repaired, the corruption remains (exit 2)');
  t.match(r.stdout, /1 leaked clusters\n    0 corruptions[\s\S]*Double checking[\s\S]*1 errors were found/);
});
