// qcow2 through the mount: random I/O checked by qemu-img, snapshot mode and commit, internal
// snapshots as files, mount -l, commit FILE, and crash consistency after kill -9.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { childSha256, imgmount, isMounted, killServerWhileWriting, mount, py, randomFile, run, sha256, tmpdir, waitFor, mirrorWrites } from '../helpers';


function qcow2(d: string, name: string, size: string, extra: string[] = []): string {
  const f = path.join(d, name);
  const r = run('qemu-img', ['create', '-q', '-f', 'qcow2', ...extra, f, size]);
  if (r.code !== 0) throw new Error(r.stderr);
  return f;
}

t.test('random writes through a qcow2 mount: qemu-img check clean, compare equal', async (t) => {
  const d = tmpdir(t);
  const base = path.join(d, 'base.raw');
  randomFile(base, 16 << 20, 9);
  const img = qcow2(d, 'top.qcow2', '16M', ['-b', 'base.raw', '-F', 'raw', '-o', 'cluster_size=4096']);
  const ref = path.join(d, 'ref.raw');
  fs.copyFileSync(base, ref);
  const mnt = path.join(d, 'm');
  t.equal(mount(t, img, mnt).code, 0);
  const w = mirrorWrites(5, 120, [path.join(mnt, 'disk.raw'), ref], 200000);
  t.equal(w.stdout.trim(), 'ok', w.stderr);
  t.equal(childSha256(path.join(mnt, 'disk.raw')), childSha256(ref), 'mount reads what was written');
  t.equal(imgmount(['unmount', mnt]).code, 0);
  const c = run('qemu-img', ['check', img]);
  t.equal(c.code, 0, `qemu-img check: ${c.stdout}${c.stderr}`);
  t.equal(run('qemu-img', ['compare', '-F', 'raw', img, ref]).code, 0, 'qemu-img compare: identical');
  t.equal(sha256(fs.readFileSync(base)), sha256(randomFile(path.join(d, 'again.raw'), 16 << 20, 9)), 'backing file untouched');
});

t.test('snapshot mode: the image is never modified until commit <mountpoint>', async (t) => {
  const d = tmpdir(t);
  const img = qcow2(d, 'a.qcow2', '8M');
  run('qemu-io', ['-c', 'write -P 0x11 0 1M', img]);
  const before = sha256(fs.readFileSync(img));
  const ref = path.join(d, 'ref.raw');
  run('qemu-img', ['convert', '-O', 'raw', img, ref]);
  const mnt = path.join(d, 'm');
  t.equal(mount(t, img, mnt, ['-s']).code, 0);
  t.equal(mirrorWrites(7, 40, [path.join(mnt, 'disk.raw'), ref], 200000).stdout.trim(), 'ok');
  t.equal(sha256(fs.readFileSync(img)), before, 'image byte-identical while writing in -s mode');
  t.equal(run('qemu-img', ['check', '-U', img]).code, 0);
  const c = imgmount(['commit', mnt]);
  t.equal(c.code, 0, `commit <mountpoint>: ${c.stderr}`);
  t.equal(childSha256(path.join(mnt, 'disk.raw')), childSha256(ref), 'still the same view after commit');
  // more writes after the commit land in the emptied overlay only
  const ref2 = path.join(d, 'ref2.raw');
  fs.copyFileSync(ref, ref2);
  t.equal(mirrorWrites(8, 10, [path.join(mnt, 'disk.raw'), ref2], 200000).stdout.trim(), 'ok');
  t.equal(imgmount(['unmount', mnt]).code, 0);
  t.equal(run('qemu-img', ['check', img]).code, 0, 'image passes qemu-img check after commit');
  t.equal(run('qemu-img', ['compare', '-F', 'raw', img, ref]).code, 0, 'image holds exactly the committed state');
  const tmp = fs.readdirSync(process.env.TMPDIR || '/tmp').filter((f) => f.startsWith('imgmount-snapshot-'));
  t.same(tmp, [], 'no overlay left behind');
  const r = imgmount(['commit', mnt]);
  t.not(r.code, 0, 'commit on a path that is no longer mounted fails');
});

t.test('commit on a mount without -s is refused', async (t) => {
  const d = tmpdir(t);
  const img = qcow2(d, 'a.qcow2', '1M');
  const mnt = path.join(d, 'm');
  t.equal(mount(t, img, mnt).code, 0);
  const r = imgmount(['commit', mnt]);
  t.equal(r.code, 1);
  t.match(r.stderr, /not mounted in snapshot mode/);
});

t.test('internal snapshots appear read-only under snapshots/, mount -l exposes one', async (t) => {
  const d = tmpdir(t);
  const img = qcow2(d, 'a.qcow2', '4M');
  run('qemu-io', ['-c', 'write -P 0x22 0 64k', img]);
  t.equal(run('qemu-img', ['snapshot', '-c', 'first', img]).code, 0);
  const first = path.join(d, 'first.raw');
  run('qemu-img', ['convert', '-O', 'raw', img, first]);
  run('qemu-io', ['-c', 'write -P 0x33 32k 64k', img]);
  t.equal(run('qemu-img', ['snapshot', '-c', 'a/b', img]).code, 0, 'a tag with a slash');
  const mnt = path.join(d, 'm');
  t.equal(mount(t, img, mnt).code, 0);
  t.same(run('ls', [path.join(mnt, 'snapshots')]).stdout.trim().split('\n').sort(), ['a_b.raw', 'first.raw']);
  t.equal(childSha256(path.join(mnt, 'snapshots', 'first.raw')), sha256(fs.readFileSync(first)), 'snapshot contents');
  const w = py('import os,sys\ntry:\n  os.open(sys.argv[1], os.O_WRONLY)\nexcept OSError as e:\n  print(e.errno)', [path.join(mnt, 'snapshots', 'first.raw')]);
  t.equal(w.stdout.trim(), '30', 'snapshot files are read-only');
  t.equal(imgmount(['unmount', mnt]).code, 0);
  t.equal(mount(t, img, mnt, ['-l', 'first']).code, 0);
  t.equal(childSha256(path.join(mnt, 'disk.raw')), sha256(fs.readFileSync(first)), 'mount -l first');
  t.equal(imgmount(['unmount', mnt]).code, 0);
  const bad = imgmount(['mount', '-l', 'nosuch', img, mnt]);
  t.equal(bad.code, 1, `unknown snapshot: ${bad.stderr}`);
});

t.test('commit FILE writes into the backing file and empties the image', async (t) => {
  const d = tmpdir(t);
  const base = qcow2(d, 'base.qcow2', '4M');
  run('qemu-io', ['-c', 'write -P 0x44 0 1M', base]);
  const top = qcow2(d, 'top.qcow2', '4M', ['-b', 'base.qcow2', '-F', 'qcow2']);
  run('qemu-io', ['-c', 'write -P 0x55 512k 1M', top]);
  const want = path.join(d, 'want.raw');
  run('qemu-img', ['convert', '-O', 'raw', top, want]);
  const c = imgmount(['commit', top]);
  t.equal(c.code, 0, c.stderr);
  t.equal(c.stdout.trim(), 'Image committed.');
  t.equal(run('qemu-img', ['compare', '-F', 'raw', base, want]).code, 0, 'base now holds the data');
  t.equal(run('qemu-img', ['check', base]).code, 0);
  const map = JSON.parse(run('qemu-img', ['map', '--output', 'json', top]).stdout) as Array<{ depth: number; data: boolean }>;
  t.notOk(map.some((e) => e.depth === 0 && e.data), 'top is empty');
  t.equal(run('qemu-img', ['compare', top, want]).code, 0);
});

t.test('kill -9 of the server while writing: qemu-img check finds at most leaks', async (t) => {
  const d = tmpdir(t);
  const img = qcow2(d, 'a.qcow2', '64M', ['-o', 'cluster_size=4096']);
  const mnt = path.join(d, 'm');
  t.equal(mount(t, img, mnt).code, 0);
  // a writer that keeps allocating new clusters while the server is killed
  const killed = await killServerWhileWriting(mnt, `
import os, random, sys
fd = os.open(sys.argv[1], os.O_RDWR)
r = random.Random(3)
try:
    while True:
        os.pwrite(fd, os.urandom(8192), r.randrange(0, (64<<20) - 8192))
except OSError:
    pass
`, 1500);
  t.ok(killed.pid, 'server state found');
  t.equal(killed.unmount.code, 0, 'unmount cleans up the dead mount');
  t.notOk(isMounted(mnt));
  const c = run('qemu-img', ['check', img]);
  t.ok(c.code === 0 || c.code === 3, `qemu-img check exit ${c.code} (0 or 3 = leaks only): ${c.stdout.split('\n').slice(-4).join(' ')}`);
  t.notMatch(c.stdout, /ERROR/, 'no corruption reported');
  const reopen = imgmount(['info', img]);
  t.equal(reopen.code, 0, 'image opens again');
});
