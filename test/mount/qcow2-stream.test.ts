// Sequential allocating writes into a qcow2 without a backing file: the node links windows of
// clusters ahead of the guest and the native threads write them; what the guest never wrote
// is given back at flush, so the image holds exactly what was written (qemu-img check, map and
// compare agree), and a kill -9 in the middle leaves at most leaked clusters.
import t, { Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { openImage } from '../../lib/core/graph';
import { FuseExport } from '../../lib/fuse/export';
import { controlSocket } from '../../lib/fuse/runtime';
import { imgmount, isMounted, killServerWhileWriting, mount, run, tmpdir } from '../helpers';

const canMount = fs.existsSync('/dev/fuse') && process.geteuid?.() === 0;
const MiB = 1 << 20;

function child(cmd: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: 120_000 }, (err, stdout, stderr) => resolve({ code: err ? 1 : 0, stdout: String(stdout), stderr: String(stderr) }));
  });
}

// writes "offset:length:seed" runs in 1 MiB O_DIRECT requests (fsync between groups when
// asked, 'pause' waits 0.3 s), mirroring every byte into the reference file
const WRITER = `
import mmap, os, random, sys, time
path, ref, plan = sys.argv[1], sys.argv[2], sys.argv[3]
fd = os.open(path, os.O_RDWR | os.O_DIRECT)
rf = os.open(ref, os.O_RDWR)
buf = mmap.mmap(-1, 1 << 20)
for step in plan.split(','):
    if step == 'sync':
        os.fsync(fd); continue
    if step == 'pause':
        time.sleep(0.3); continue
    off, length, seed = (int(x) for x in step.split(':'))
    r = random.Random(seed)
    done = 0
    while done < length:
        n = min(1 << 20, length - done)
        data = r.randbytes(n)
        buf[:n] = data
        if os.pwritev(fd, [memoryview(buf)[:n]], off + done) != n: raise SystemExit('short write')
        os.pwrite(rf, data, off + done)
        done += n
print('ok')
`;

/** exports img (in process), runs WRITER's plan on it with a size-byte reference file beside it,
 *  unmounts; returns the reference, the export's request counts and both steps' results */
async function streamInto(t: Test, img: string, size: number, plan: string) {
  const d = path.dirname(img);
  const ref = path.join(d, 'ref.raw');
  fs.writeFileSync(ref, '');
  fs.truncateSync(ref, size);
  const node = await openImage(img, { readOnly: false });
  const mnt = path.join(d, 'm');
  fs.mkdirSync(mnt);
  const exp = new FuseExport([{ path: 'disk.raw', node, readOnly: false }], { mountpoint: mnt, allowOther: false, fsname: 'imgmount:test' });
  await exp.start();
  let mounted = true;
  t.teardown(async () => { if (mounted) { await child('umount', ['-l', mnt]); await exp.stop(); await node.close(); } });
  const writer = await child('python3', ['-c', WRITER, path.join(mnt, 'disk.raw'), ref, plan]);
  const stats = exp.stats();
  const unmount = await child('umount', [mnt]);
  await exp.wait();
  await exp.stop();
  await node.close();
  mounted = false;
  return { ref, writer, stats, unmount };
}

/** what qemu-img says of the image written through streamInto: clean and equal to the reference */
function checkAndCompare(t: Test, img: string, ref: string): void {
  const chk = run('qemu-img', ['check', '--output', 'json', img]);
  t.equal(chk.code, 0, `qemu-img check clean, no leaks: ${chk.stdout}${chk.stderr}`);
  t.equal(run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', img, ref]).code, 0, 'qemu-img compare: identical');
}

t.test('sequential writes into an empty qcow2 go native; unwritten windows are given back', { skip: canMount ? false : 'needs /dev/fuse and root' }, async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'empty.qcow2');
  t.equal(run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '256M']).code, 0);
  // a stream, a flush in the middle of a linked window, a second stream elsewhere, and a
  // write that ends in the middle of a cluster
  const plan = [`0:${40 * MiB}:1`, 'sync', `${40 * MiB}:${3 * MiB}:2`, `${100 * MiB}:${24 * MiB}:3`, `${200 * MiB}:${1 * MiB + 4096}:4`].join(',');
  const { ref, writer, stats: st, unmount } = await streamInto(t, img, 256 * MiB, plan);
  t.equal(writer.stdout.trim(), 'ok', `writer: ${writer.stderr}`);
  t.ok(st && st.nativeWrites >= 40, `most 1 MiB writes were served natively (${JSON.stringify(st)})`);
  t.equal(unmount.code, 0, 'unmount');
  checkAndCompare(t, img, ref);
  // allocated exactly where written (whole 64 KiB clusters)
  const map = JSON.parse(run('qemu-img', ['map', '--output', 'json', img]).stdout) as { start: number; length: number; data: boolean }[];
  const data = map.filter((e) => e.data).map((e) => [e.start / MiB, (e.start + e.length) / MiB]);
  t.same(data, [[0, 43], [100, 124], [200, 201.0625]], 'qemu-img map: data only where the guest wrote');
  // (the file may be longer: clusters linked ahead and given back stay holes until reused)
  const used = fs.statSync(img).blocks * 512;
  t.ok(used < 70 * MiB, `the file occupies what was written and its metadata (${used} bytes)`);
});

// With 4 KiB clusters an L2 table covers 2 MiB, so a stream crosses a table boundary every
// 2 MiB: each window is linked while the one before it is being written (the first native
// write into a window asks for the next ones), not when a write runs past its end.
t.test('a stream across many L2 tables is linked ahead while it is written', { skip: canMount ? false : 'needs /dev/fuse and root' }, async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'small-clusters.qcow2');
  t.equal(run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', img, '96M']).code, 0);
  const { ref, writer, stats: st, unmount } = await streamInto(t, img, 96 * MiB, `0:${64 * MiB}:7`);
  t.equal(writer.stdout.trim(), 'ok', `writer: ${writer.stderr}`);
  // 32 L2 tables: linked only when a write misses, a request per table would reach JavaScript
  t.ok(st && st.jsRequests <= 8 && st.nativeWrites >= 56, `the stream ran natively past every table boundary (${JSON.stringify(st)})`);
  t.equal(unmount.code, 0, 'unmount');
  checkAndCompare(t, img, ref);
  const map = JSON.parse(run('qemu-img', ['map', '--output', 'json', img]).stdout) as { start: number; length: number; data: boolean }[];
  // (map splits where the host offsets jump over an L2 table: join what touches in the guest)
  const spans: number[][] = [];
  for (const e of map.filter((x) => x.data)) {
    const last = spans[spans.length - 1];
    if (last && last[1] === e.start / MiB) last[1] = (e.start + e.length) / MiB;
    else spans.push([e.start / MiB, (e.start + e.length) / MiB]);
  }
  t.same(spans, [[0, 64]], 'qemu-img map: data only where the guest wrote');
});

// A 4 KiB write served in JavaScript maps its neighbourhood: the rest of the cluster it
// allocated is then written natively (only the 4 KiB written was mapped before, so random
// small writes into an empty qcow2 all went to JavaScript).
t.test('small writes into a cluster just allocated go native', { skip: canMount ? false : 'needs /dev/fuse and root' }, async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'random.qcow2');
  t.equal(run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '256M']).code, 0);
  // four clusters far apart (no stream), each: one 4 KiB write, a pause, then its other 15
  const plan: string[] = [];
  for (const [i, at] of [20, 60, 100, 140].entries()) {
    plan.push(`${at * MiB}:4096:${i * 100}`, 'pause');
    for (let k = 1; k < 16; k++) plan.push(`${at * MiB + k * 4096}:4096:${i * 100 + k}`);
  }
  const { ref, writer, stats: st, unmount } = await streamInto(t, img, 256 * MiB, plan.join(','));
  t.equal(writer.stdout.trim(), 'ok', `writer: ${writer.stderr}`);
  t.ok(st && st.jsRequests <= 8 && st.nativeWrites >= 56, `the writes after each first one ran natively (${JSON.stringify(st)})`);
  t.equal(unmount.code, 0, 'unmount');
  checkAndCompare(t, img, ref);
});

t.test('kill -9 while a sequential stream is being linked ahead: at most leaks', { skip: canMount ? false : 'needs /dev/fuse and root' }, async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'a.qcow2');
  t.equal(run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '512M']).code, 0);
  const mnt = path.join(d, 'm');
  t.equal(mount(t, img, mnt).code, 0);
  t.ok(fs.existsSync(controlSocket(mnt)), 'the server listens on its control socket');
  // sequential 1 MiB writes with an fsync now and then, round and round
  const killed = await killServerWhileWriting(mnt, `
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, 1 << 20)
buf[:] = os.urandom(1 << 20)
i = 0
try:
    while True:
        os.pwritev(fd, [buf], (i % 512) << 20)
        i += 1
        if i % 37 == 0: os.fsync(fd)
except OSError:
    pass
`, 1200);
  t.ok(killed.pid, 'server state found');
  t.equal(killed.unmount.code, 0, 'unmount cleans up the dead mount');
  t.notOk(isMounted(mnt));
  t.notOk(fs.existsSync(controlSocket(mnt)), 'the dead server\'s control socket is gone too');
  const c = run('qemu-img', ['check', img]);
  t.ok(c.code === 0 || c.code === 3, `qemu-img check exit ${c.code} (0 or 3 = leaks only): ${c.stdout.split('\n').slice(-4).join(' ')}`);
  t.notMatch(c.stdout, /ERROR/, 'no corruption reported');
  const fix = run('qemu-img', ['check', '-r', 'leaks', img]);
  t.ok(fix.code === 0, `leaks repaired: ${fix.stdout.split('\n').slice(-3).join(' ')}`);
});
