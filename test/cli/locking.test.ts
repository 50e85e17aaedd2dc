// qemu-compatible image locking, both ways, against qemu-io and qemu-storage-daemon.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { background, hasCommand, imgmount, isMounted, mount, randomFile, run, tmpdir, waitFor } from '../helpers';

const out = (p: unknown): string => (p as { output(): string }).output();

t.test('qemu-io holding the image for writing blocks a mount (exit 3)', async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'a.img');
  randomFile(img, 1 << 20);
  const q = background(t, 'qemu-io', ['-f', 'raw', img]);
  q.stdin!.write('read 0 512\n');
  await waitFor(() => /read 512\/512/.test(out(q)), 10000);
  t.match(out(q), /read 512\/512/, 'qemu-io has the image open');
  const mnt = path.join(d, 'm');
  const r = imgmount(['mount', img, mnt]);
  t.equal(r.code, 3, 'locked: exit 3');
  t.match(r.stderr, /^imgmount: .*Failed to get shared "write" lock: another process/);
  const ro = imgmount(['mount', '-r', img, mnt]);
  t.equal(ro.code, 3, 'a read-only mount also refuses a concurrent writer');
  const shared = mount(t, img, mnt, ['-r', '--share-rw']);
  t.equal(shared.code, 0, `--share-rw allows it: ${shared.stderr}`);
  t.equal(imgmount(['unmount', mnt]).code, 0);
  const off = mount(t, img, mnt, ['--locking', 'off']);
  t.equal(off.code, 0, '--locking off ignores locks');
  t.equal(imgmount(['unmount', mnt]).code, 0);
});

t.test('a writable mount blocks qemu-io writers and qemu-img readers of consistent data', async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'a.img');
  randomFile(img, 1 << 20);
  const mnt = path.join(d, 'm');
  t.equal(mount(t, img, mnt).code, 0);
  const w = run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', img]);
  t.not(w.code, 0, 'qemu-io write refused');
  t.match(w.stderr, /Failed to get "write" lock/);
  const u = run('qemu-io', ['-f', 'raw', '-U', '-r', '-c', 'read 0 512', img]);
  t.equal(u.code, 0, 'qemu-io -U -r (force share) still reads');
  t.equal(imgmount(['unmount', mnt]).code, 0);
  t.equal(run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', img]).code, 0, 'after unmount qemu-io writes');
});

t.test('qemu-storage-daemon and imgmount exclude each other', { skip: !hasCommand('qemu-storage-daemon') && 'qemu-storage-daemon missing' }, async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'a.img');
  randomFile(img, 1 << 20);
  const sock = path.join(d, 'nbd.sock');
  const qsd = background(t, 'qemu-storage-daemon', [
    '--blockdev', `driver=file,node-name=f0,filename=${img}`,
    '--blockdev', 'driver=raw,node-name=r0,file=f0',
    '--nbd-server', `addr.type=unix,addr.path=${sock}`,
    '--export', 'type=nbd,id=e0,node-name=r0,writable=on',
  ]);
  t.ok(await waitFor(() => fs.existsSync(sock), 10000), `qemu-storage-daemon started: ${out(qsd)}`);
  const mnt = path.join(d, 'm');
  const r = imgmount(['mount', img, mnt]);
  t.equal(r.code, 3, `refused while qsd exports it writable: ${r.stderr}`);
  qsd.kill('SIGTERM');
  await waitFor(() => qsd.exitCode !== null || qsd.signalCode !== null, 10000);
  t.equal(mount(t, img, mnt).code, 0, 'mounts once qsd stopped');
  const qsd2 = background(t, 'qemu-storage-daemon', [
    '--blockdev', `driver=file,node-name=f0,filename=${img}`,
    '--blockdev', 'driver=raw,node-name=r0,file=f0',
    '--nbd-server', `addr.type=unix,addr.path=${sock}2`,
    '--export', 'type=nbd,id=e0,node-name=r0,writable=on',
  ]);
  await waitFor(() => qsd2.exitCode !== null, 10000);
  t.not(qsd2.exitCode, 0, 'qemu-storage-daemon cannot take the image while mounted');
  t.match(out(qsd2), /lock/);
  t.equal(imgmount(['unmount', mnt]).code, 0);
  t.notOk(isMounted(mnt));
});
