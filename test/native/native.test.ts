// Tests of the native addon: the FUSE server (native map + JS fallback) and the syscall helpers.
// The mount is only ever touched from child processes: this process serves it.
import t from 'tap';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { execFile } from 'node:child_process';
import type { NativeAddon, FuseServer, FuseRequest } from '../../lib/core/native';

const ROOT = path.join(__dirname, '..', '..', '..');
// eslint-disable-next-line @typescript-eslint/no-var-requires
const addon = require('node-gyp-build')(ROOT) as NativeAddon;

const MiB = 1 << 20;
const SIZE = 8 * MiB;
const MAP_WRITABLE = 1;
const MNT_DETACH = 2;

interface RunResult { code: number; stdout: string; stderr: string }
function run(cmd: string, args: string[]): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: 60_000, maxBuffer: 64 * MiB }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as NodeJS.ErrnoException).code === 'number'
        ? Number((err as NodeJS.ErrnoException).code) : 1) : 0;
      resolve({ code, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}
const py = (src: string, ...args: string[]) => run('python3', ['-c', src, ...args]);

const canMount = fs.existsSync('/dev/fuse') && (process.geteuid?.() === 0 || fs.existsSync('/usr/bin/fusermount3'));

t.test('syscall helpers', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'imgmount-native-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'f');
  fs.writeFileSync(file, Buffer.alloc(1 * MiB, 1));
  const a = fs.openSync(file, 'r+');
  const b = fs.openSync(file, 'r+');
  t.teardown(() => { fs.closeSync(a); fs.closeSync(b); });

  t.equal(addon.ofdSetLock(a, 0, 100, 'w'), 0, 'write lock taken');
  t.equal(addon.ofdGetLock(a, 0, 100, 'w'), null, 'own lock does not conflict');
  t.same(addon.ofdGetLock(b, 50, 10, 'r'), { type: 'w', pid: -1 }, 'other open file sees the OFD lock');
  t.equal(addon.ofdSetLock(b, 0, 1, 'r'), 11 /* EAGAIN */, 'conflicting lock refused');
  t.equal(addon.ofdGetLock(b, 200, 10, 'w'), null, 'disjoint range is free');
  t.equal(addon.ofdSetLock(a, 0, 100, 'u'), 0, 'unlock');
  t.equal(addon.ofdSetLock(b, 0, 1, 'r'), 0, 'lock free after unlock');

  t.equal(addon.fallocate(a, 1 | 2 /* KEEP_SIZE|PUNCH_HOLE */, 0, 512 * 1024), 0, 'punch hole');
  const data = addon.lseek(a, 0, 3);
  t.ok(data === 512 * 1024 || data === 0, `SEEK_DATA after the hole (${data})`);
  t.equal(addon.lseek(a, 2 * MiB, 3), -6 /* -ENXIO */, 'SEEK_DATA past EOF is -ENXIO');
  t.equal(addon.fallocate(-1, 0, 0, 1), 9 /* EBADF */, 'fallocate errno');

  t.throws(() => addon.blkGetSize64(a), 'BLKGETSIZE64 on a regular file throws');
  t.equal(addon.umount(dir, 0), 22 /* EINVAL */, 'umount of a non-mountpoint is EINVAL');

  const buf = addon.allocAligned(8192, 4096);
  t.ok(Buffer.isBuffer(buf), 'allocAligned gives a Buffer');
  t.equal(buf.length, 8192);
  t.ok(addon.isAligned(buf, 4096), 'aligned to 4096');
  t.notOk(addon.isAligned(buf.subarray(1), 2), 'subarray at +1 is not 2-aligned');
  t.ok(buf.every((x) => x === 0), 'zero-filled');
});

t.test('fuse server', { skip: canMount ? false : 'no /dev/fuse or fusermount3' }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'imgmount-fuse-'));
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const srcPath = path.join(dir, 'src.raw');
  const snapPath = path.join(dir, 'snap.raw');
  const refPath = path.join(dir, 'ref.raw');
  const ref = crypto.randomBytes(SIZE);
  const snapData = crypto.randomBytes(SIZE);
  fs.writeFileSync(srcPath, ref);
  fs.writeFileSync(snapPath, snapData);
  const fd = fs.openSync(srcPath, 'r+');
  const snapFd = fs.openSync(snapPath, 'r');
  const fds = [fd, snapFd];
  const seen: Record<string, number> = {};

  let srv: FuseServer | null = null;
  let exited = -1;
  let resolveInit!: () => void;
  const initP = new Promise<void>((r) => { resolveInit = r; });
  let resolveExit!: (e: number) => void;
  const exitP = new Promise<number>((r) => { resolveExit = r; });

  const serve = (r: FuseRequest) => {
    const s = srv!;
    seen[r.op] = (seen[r.op] ?? 0) + 1;
    try {
      switch (r.op) {
        case 'read': {
          const b = Buffer.alloc(r.length);
          const n = fs.readSync(fds[r.file], b, 0, r.length, r.offset);
          addon.reply(s, r.id, 0, b.subarray(0, n));
          break;
        }
        case 'write':
          fs.writeSync(fds[r.file], r.data!, 0, r.data!.length, r.offset);
          addon.reply(s, r.id, 0, r.data!.length);
          break;
        case 'fsync':
          fs.fsyncSync(fds[r.file]);
          addon.reply(s, r.id, 0);
          break;
        case 'lseek':
          addon.reply(s, r.id, 0, r.offset);
          break;
        default:
          addon.reply(s, r.id, 95 /* EOPNOTSUPP */);
      }
    } catch (e) {
      addon.reply(s, r.id, 5 /* EIO */);
    }
  };

  srv = addon.fuseMount({
    mountpoint: mnt,
    fsname: 'imgmount-test',
    subtype: 'imgmount',
    allowOther: false,
    threads: 2,
    maxWrite: MiB,
    uid: process.getuid!(),
    gid: process.getgid!(),
    files: [
      { path: 'disk.raw', size: SIZE, readOnly: false, blocks: SIZE / 512 },
      { path: 'snapshots/a.raw', size: SIZE, readOnly: true, blocks: SIZE / 512 },
    ],
    onRequests: () => { for (const r of addon.takeRequests(srv!)) serve(r); },
    onInit: () => resolveInit(),
    onExit: (e) => { exited = e; resolveExit(e); },
  });
  t.teardown(() => {
    if (srv) {
      if (addon.umount(mnt, 0) !== 0) addon.umount(mnt, MNT_DETACH);
      addon.stop(srv);
    }
    fs.closeSync(fd);
    fs.closeSync(snapFd);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  // the kernel sends INIT as soon as anything touches the mount
  const statP = run('stat', ['-c', '%s %a %F', path.join(mnt, 'disk.raw')]);
  await initP;
  t.pass('FUSE_INIT answered');
  // first 4 MiB of disk.raw natively, read-only snapshot natively (not writable)
  addon.setMap(srv, 0, new Float64Array([0, 4 * MiB, fd, 0, MAP_WRITABLE]));
  addon.setMap(srv, 1, new Float64Array([0, SIZE, snapFd, 0, 0]));

  const st = await statP;
  t.equal(st.stdout.trim(), `${SIZE} 644 regular file`, 'stat of disk.raw');
  const st2 = await run('stat', ['-c', '%s %a', path.join(mnt, 'snapshots', 'a.raw')]);
  t.equal(st2.stdout.trim(), `${SIZE} 444`, 'stat of the read-only snapshot');

  const ls = await run('ls', [path.join(mnt, 'snapshots')]);
  t.equal(ls.stdout.trim(), 'a.raw', 'ls snapshots/');
  const lsRoot = await run('ls', [mnt]);
  t.same(lsRoot.stdout.trim().split('\n').sort(), ['disk.raw', 'snapshots'], 'ls of the root');

  t.equal((await run('cmp', [path.join(mnt, 'disk.raw'), refPath + '.none'])).code, 2, 'cmp sanity');
  fs.writeFileSync(refPath, ref);
  let c = await run('cmp', [path.join(mnt, 'disk.raw'), refPath]);
  t.equal(c.code, 0, 'disk.raw reads identical to the source ' + c.stdout + c.stderr);
  c = await run('cmp', [path.join(mnt, 'snapshots', 'a.raw'), snapPath]);
  t.equal(c.code, 0, 'snapshot reads identical ' + c.stdout + c.stderr);
  const afterRead = addon.stats(srv);
  t.ok(afterRead.nativeReads > 0, 'native reads happened');
  t.ok(afterRead.jsRequests > 0, 'JS reads happened');

  // unaligned writes through dd, some crossing the native/JS boundary at 4 MiB
  const writes: Array<[number, number]> = [
    [100, 5000], [4 * MiB - 1000, 3000], [4 * MiB + 12345, 70000], [2 * MiB - 7, 1 * MiB + 33],
    [SIZE - 4096 - 3, 4096 + 3], [0, 1], [3 * MiB + 4096, 8192], [4 * MiB - 3 * MiB / 2, 3 * MiB],
  ];
  for (const [off, len] of writes) {
    const patch = crypto.randomBytes(len);
    const pf = path.join(dir, 'patch');
    fs.writeFileSync(pf, patch);
    const r = await run('dd', [`if=${pf}`, `of=${path.join(mnt, 'disk.raw')}`, `bs=${len}`, 'count=1',
      `seek=${off}`, 'oflag=seek_bytes', 'conv=notrunc', 'status=none']);
    t.equal(r.code, 0, `dd write ${len} bytes at ${off} ${r.stderr}`);
    patch.copy(ref, off);
  }
  fs.writeFileSync(refPath, ref);
  c = await run('cmp', [path.join(mnt, 'disk.raw'), refPath]);
  t.equal(c.code, 0, 'contents after writes match the reference ' + c.stdout + c.stderr);
  t.equal(Buffer.compare(fs.readFileSync(srcPath), ref), 0, 'backing file holds the writes');
  const afterWrite = addon.stats(srv);
  t.ok(afterWrite.nativeWrites > 0, 'native writes happened');
  t.ok((seen.write ?? 0) > 0, 'JS writes happened');

  // writes past the end: partial write reports what fit, fully beyond is ENOSPC
  const disk = path.join(mnt, 'disk.raw');
  let p = await py(`import os,sys
fd=os.open(sys.argv[1], os.O_RDWR)
print(os.pwrite(fd, b'z'*1000, ${SIZE - 500}))
try:
    os.pwrite(fd, b'z'*10, ${SIZE + 4096})
    print('no error')
except OSError as e:
    print(e.errno)
os.fsync(fd)
print('fsync ok')
`, disk);
  t.equal(p.stdout.trim(), '500\n28\nfsync ok', 'short write at EOF, ENOSPC beyond, fsync ' + p.stderr);
  ref.fill('z', SIZE - 500);
  t.ok((seen.fsync ?? 0) > 0, 'fsync went to JS');

  // read-only file
  p = await py(`import os,sys
try:
    os.open(sys.argv[1], os.O_RDWR)
    print('opened')
except OSError as e:
    print(e.errno)
`, path.join(mnt, 'snapshots', 'a.raw'));
  t.equal(p.stdout.trim(), '30', 'EROFS when opening the read-only file for writing ' + p.stderr);

  // truncate is refused
  p = await py(`import os,sys
try:
    os.truncate(sys.argv[1], 4096)
    print('truncated')
except OSError as e:
    print(e.errno)
`, disk);
  t.equal(p.stdout.trim(), '1', 'size change is EPERM ' + p.stderr);

  // SEEK_DATA goes to JS; our JS side says "data right here"
  p = await py(`import os,sys
fd=os.open(sys.argv[1], os.O_RDONLY)
print(os.lseek(fd, 12345, os.SEEK_DATA))
`, disk);
  t.equal(p.stdout.trim(), '12345', 'SEEK_DATA answered by JS ' + p.stderr);
  t.ok((seen.lseek ?? 0) > 0, 'lseek reached JS');

  // setFileAttr is visible at once
  addon.setFileAttr(srv, 1, 4 * MiB, 8192);
  const st3 = await run('stat', ['-c', '%s %b', path.join(mnt, 'snapshots', 'a.raw')]);
  t.equal(st3.stdout.trim(), `${4 * MiB} 8192`, 'new size after setFileAttr');
  addon.setFileAttr(srv, 1, SIZE, SIZE / 512);

  // invalidate: everything now comes from JS and is still correct
  addon.invalidate(srv, 0, 0, SIZE);
  const before = addon.stats(srv);
  fs.writeFileSync(refPath, ref);
  c = await run('cmp', [disk, refPath]);
  t.equal(c.code, 0, 'contents after invalidate ' + c.stdout + c.stderr);
  const after = addon.stats(srv);
  t.equal(after.nativeReads, before.nativeReads, 'no native reads after invalidate');
  t.ok(after.jsRequests > before.jsRequests, 'reads went to JS after invalidate');

  // a partial invalidate splits an extent; a MAP_ZERO entry reads zeros
  addon.setMap(srv, 0, new Float64Array([0, 2 * MiB, fd, 0, MAP_WRITABLE, 2 * MiB, 2 * MiB, -1, 0, 2]));
  addon.invalidate(srv, 0, 1 * MiB, 4096);
  p = await py(`import os,sys,hashlib
fd=os.open(sys.argv[1], os.O_RDONLY)
a=os.pread(fd, 3*1024*1024, 0)
print(hashlib.sha256(a[:2*1024*1024]).hexdigest(), a[2*1024*1024:] == bytes(1024*1024))
`, disk);
  const want = crypto.createHash('sha256').update(ref.subarray(0, 2 * MiB)).digest('hex');
  t.equal(p.stdout.trim(), `${want} True`, 'split extents and zero extents read right ' + p.stderr);

  // unmount externally: the threads notice and onExit fires
  t.equal(addon.umount(mnt, 0), 0, 'umount');
  t.equal(await exitP, 0, 'onExit(0) after unmount');
  t.equal(exited, 0);
  addon.stop(srv);
  const s = srv;
  srv = null;
  t.ok(addon.stats(s).nativeReads > 0, 'stats still readable after stop');
});

t.test('stop() while mounted fails pending users instead of hanging', { skip: canMount ? false : 'no fuse' }, async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'imgmount-fuse-'));
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  let srv: FuseServer | null = null;
  let resolveInit!: () => void;
  const initP = new Promise<void>((r) => { resolveInit = r; });
  let resolveExit!: (e: number) => void;
  const exitP = new Promise<number>((r) => { resolveExit = r; });
  srv = addon.fuseMount({
    mountpoint: mnt, fsname: 'imgmount-test', subtype: 'imgmount', allowOther: false, threads: 3,
    maxWrite: MiB, uid: 0, gid: 0,
    files: [{ path: 'disk.raw', size: MiB, readOnly: false, blocks: 0 }],
    onRequests: () => { /* never answered: stop() must cope with requests left in JS */ addon.takeRequests(srv!); },
    onInit: () => resolveInit(),
    onExit: (e) => resolveExit(e),
  });
  const s = srv;
  t.teardown(() => {
    addon.umount(mnt, MNT_DETACH);
    addon.stop(s);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const st = run('stat', ['-c', '%s', path.join(mnt, 'disk.raw')]);
  await initP;
  t.equal((await st).stdout.trim(), String(MiB), 'served');
  // a read that JS never answers
  const hung = run('dd', [`if=${path.join(mnt, 'disk.raw')}`, 'of=/dev/null', 'bs=4096', 'count=1', 'status=none']);
  await new Promise((r) => setTimeout(r, 300));
  addon.stop(s);
  t.equal(await exitP, 0, 'onExit after stop()');
  const r = await hung;
  t.not(r.code, 0, 'the pending read failed after stop() ' + r.stderr.trim());
  const r2 = await run('stat', [path.join(mnt, 'disk.raw')]);
  t.match(r2.stderr, /not connected/, 'mount answers ENOTCONN after stop()');
  t.equal(addon.umount(mnt, 0), 0, 'umount after stop()');
  addon.stop(s); // idempotent
});

t.test('extent map: random setMap/invalidate against a model', { skip: canMount ? false : 'no fuse' }, async (t) => {
  const U = 512;             // model unit
  const N = 2048;            // units: 1 MiB file
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'imgmount-map-'));
  const mnt = path.join(dir, 'mnt');
  fs.mkdirSync(mnt);
  const A = crypto.randomBytes(N * U);  // what JS serves
  const B = crypto.randomBytes(N * U);  // where map entries point
  const bPath = path.join(dir, 'b');
  fs.writeFileSync(bPath, B);
  const bFd = fs.openSync(bPath, 'r');
  const model = new Int32Array(N).fill(-1);
  const content = (off: number, len: number) => {
    const out = Buffer.alloc(len);
    for (let p = off; p < off + len;) {
      const u = Math.floor(p / U), inUnit = p % U, n = Math.min(U - inUnit, off + len - p);
      const src = model[u] < 0 ? A.subarray(u * U + inUnit) : B.subarray(model[u] * U + inUnit);
      src.copy(out, p - off, 0, n);
      p += n;
    }
    return out;
  };
  let srv: FuseServer | null = null;
  let resolveInit!: () => void;
  const initP = new Promise<void>((r) => { resolveInit = r; });
  srv = addon.fuseMount({
    mountpoint: mnt, fsname: 'imgmount-test', subtype: 'imgmount', allowOther: false, threads: 2,
    maxWrite: MiB, uid: 0, gid: 0,
    files: [{ path: 'disk.raw', size: N * U, readOnly: true, blocks: 0 }],
    onRequests: () => {
      for (const r of addon.takeRequests(srv!)) {
        if (r.op === 'read') addon.reply(srv!, r.id, 0, content(r.offset, r.length));
        else addon.reply(srv!, r.id, 38 /* ENOSYS */);
      }
    },
    onInit: () => resolveInit(),
    onExit: () => {},
  });
  const s = srv;
  t.teardown(() => {
    if (addon.umount(mnt, 0) !== 0) addon.umount(mnt, MNT_DETACH);
    addon.stop(s);
    fs.closeSync(bFd);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const first = run('stat', [path.join(mnt, 'disk.raw')]);
  await initP;
  await first;
  const rnd = (n: number) => Math.floor(Math.random() * n);
  const expPath = path.join(dir, 'expected');
  for (let round = 0; round < 25; round++) {
    const ops = 1 + rnd(4);
    for (let o = 0; o < ops; o++) {
      if (rnd(3) > 0) {
        const runs: Array<[number, number, number]> = [];
        let u = rnd(64);
        while (u < N && runs.length < 40) {
          const len = 1 + rnd(200);
          const l = Math.min(len, N - u);
          runs.push([u, l, rnd(N - l + 1)]);
          u += l + rnd(300);
        }
        const arr = new Float64Array(runs.length * 5);
        runs.forEach(([g, l, h], i) => arr.set([g * U, l * U, bFd, h * U, 0], i * 5));
        addon.setMap(s, 0, arr);
        for (const [g, l, h] of runs) for (let k = 0; k < l; k++) model[g + k] = h + k;
      } else {
        const g = rnd(N), l = 1 + rnd(Math.min(300, N - g));
        addon.invalidate(s, 0, g * U, l * U);
        for (let k = 0; k < l; k++) model[g + k] = -1;
      }
    }
    fs.writeFileSync(expPath, content(0, N * U));
    const c = await run('cmp', [path.join(mnt, 'disk.raw'), expPath]);
    if (c.code !== 0) { t.fail(`round ${round}: ${c.stdout}${c.stderr}`); return; }
  }
  const st = addon.stats(s);
  t.ok(st.nativeReads > 0 && st.jsRequests > 0, `both paths used (${JSON.stringify(st)})`);
  t.pass('25 rounds of random map changes read back exactly');
});
