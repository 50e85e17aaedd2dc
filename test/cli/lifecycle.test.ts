// Mount lifecycle: ready on return, unmount waits for the server, busy mounts, --force,
// foreground signals, a killed server, read-only mounts.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { background, BIN, childSha256, imgmount, isMounted, mount, py, randomFile, run, sha256, tmpdir, waitFor } from '../helpers';

t.test('mount returns with disk.raw ready, unmount flushes and removes the created mountpoint', async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'disk.img');
  const data = randomFile(img, 8 << 20, 7);
  const mnt = path.join(d, 'mnt', 'deep');
  const r = mount(t, img, mnt);
  t.equal(r.code, 0, `mount succeeded: ${r.stderr}`);
  t.ok(isMounted(mnt), 'mounted right after mount returned');
  const st = run('stat', ['-c', '%s %F', path.join(mnt, 'disk.raw')]);
  t.equal(st.stdout.trim(), `${8 << 20} regular file`);
  t.equal(childSha256(path.join(mnt, 'disk.raw')), sha256(data), 'contents read through the mount match');
  const w = run('dd', ['if=/dev/zero', `of=${path.join(mnt, 'disk.raw')}`, 'bs=4096', 'seek=3', 'count=2', 'conv=notrunc,fsync']);
  t.equal(w.code, 0, 'dd write through the mount');
  const u = imgmount(['unmount', mnt]);
  t.equal(u.code, 0, `unmount: ${u.stderr}`);
  t.notOk(isMounted(mnt), 'no longer mounted');
  t.notOk(fs.existsSync(mnt), 'the mountpoint that mount created is gone');
  const after = fs.readFileSync(img);
  data.fill(0, 3 * 4096, 5 * 4096);
  t.ok(after.equals(data), 'written bytes are in the image after unmount');
});

t.test('mount on an existing mount is refused with exit 3', async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'a.img');
  randomFile(img, 1 << 20);
  const mnt = path.join(d, 'm');
  t.equal(mount(t, img, mnt).code, 0);
  const r = imgmount(['mount', img, mnt]);
  t.equal(r.code, 3);
  t.match(r.stderr, /^imgmount: .*already mounted/);
});

t.test('busy mount: unmount exits 3, --force unmounts', async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'a.img');
  randomFile(img, 1 << 20);
  const mnt = path.join(d, 'm');
  t.equal(mount(t, img, mnt).code, 0);
  const holder = background(t, 'sh', ['-c', `exec 3<"${path.join(mnt, 'disk.raw')}"; echo held; exec sleep 60`]);
  await waitFor(() => ((holder as unknown as { output(): string }).output().includes('held')));
  const r = imgmount(['unmount', mnt]);
  t.equal(r.code, 3, 'busy unmount exits 3');
  t.match(r.stderr, /^imgmount: unmount .*busy/);
  t.ok(isMounted(mnt), 'still mounted');
  const f = imgmount(['unmount', '--force', mnt]);
  t.equal(f.code, 0, `forced unmount: ${f.stderr}`);
  t.notOk(isMounted(mnt));
});

t.test('read-only mount refuses writes with EROFS', async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'a.img');
  const data = randomFile(img, 1 << 20);
  const mnt = path.join(d, 'm');
  t.equal(mount(t, img, mnt, ['-r']).code, 0);
  const w = py('import os,sys\ntry:\n  fd=os.open(sys.argv[1], os.O_WRONLY)\nexcept OSError as e:\n  print(e.errno)', [path.join(mnt, 'disk.raw')]);
  t.equal(w.stdout.trim(), '30', 'open for writing fails with EROFS (30)');
  t.equal(run('stat', ['-c', '%a', path.join(mnt, 'disk.raw')]).stdout.trim(), '444');
  t.equal(imgmount(['unmount', mnt]).code, 0);
  t.ok(fs.readFileSync(img).equals(data), 'image unchanged');
});

t.test('--foreground: SIGTERM unmounts cleanly and exits 0', async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'a.img');
  randomFile(img, 1 << 20);
  const mnt = path.join(d, 'm');
  fs.mkdirSync(mnt);
  const p = spawn(process.execPath, [BIN, 'mount', '--foreground', img, mnt], { stdio: 'ignore' });
  const exited = new Promise<number | null>((r) => p.on('exit', (c) => r(c)));
  t.teardown(() => { if (p.exitCode === null) p.kill('SIGKILL'); });
  t.ok(await waitFor(() => isMounted(mnt), 20000), 'mounted in the foreground');
  t.equal(run('cmp', [img, path.join(mnt, 'disk.raw')]).code, 0, 'readable');
  p.kill('SIGTERM');
  t.equal(await exited, 0, 'exit code 0 after SIGTERM');
  t.notOk(isMounted(mnt), 'unmounted');
  t.ok(fs.existsSync(mnt), 'a mountpoint that existed before stays');
});

t.test('a killed server is cleaned up by unmount', async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'a.img');
  randomFile(img, 1 << 20);
  const mnt = path.join(d, 'm');
  t.equal(mount(t, img, mnt).code, 0);
  // find the server of this mount through the runtime state
  const states = fs.readdirSync('/run/imgmount').filter((f) => f.endsWith('.json'))
    .map((f) => JSON.parse(fs.readFileSync(path.join('/run/imgmount', f), 'utf8')) as { pid: number; mountpoint: string });
  const mine = states.find((s) => s.mountpoint === mnt);
  t.ok(mine, 'runtime state written');
  process.kill(mine!.pid, 'SIGKILL');
  await waitFor(() => run('stat', [path.join(mnt, 'disk.raw')]).stderr.includes('not connected'), 5000);
  t.match(run('stat', [path.join(mnt, 'disk.raw')]).stderr, /not connected/, 'ENOTCONN after the kill');
  const u = imgmount(['unmount', mnt]);
  t.equal(u.code, 0, `unmount of a dead mount: ${u.stderr}`);
  t.notOk(isMounted(mnt));
});

t.test('mount errors: missing image 1, unknown option 1, missing mountpoint argument 1', async (t) => {
  const d = tmpdir(t);
  const mnt = path.join(d, 'm');
  const r = imgmount(['mount', path.join(d, 'missing.img'), mnt]);
  t.equal(r.code, 1);
  t.match(r.stderr, /^imgmount: .*No such file or directory\n$/);
  t.notOk(fs.existsSync(mnt), 'created mountpoint removed again after a failed mount');
  const u = imgmount(['mount', '--no-such-option', path.join(d, 'x'), mnt]);
  t.equal(u.code, 1);
  t.match(u.stderr, /^imgmount: /);
  t.equal(u.stderr.trim().split('\n').length, 1, 'one line');
  const o = imgmount(['info', '--image-opts', 'driver=raw,bogus=1,file.filename=/etc/hostname']);
  t.equal(o.code, 1);
  t.match(o.stderr, /unknown option 'bogus'/);
});
