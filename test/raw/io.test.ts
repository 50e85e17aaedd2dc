// raw through the mount: random unaligned I/O against a reference, SEEK_DATA/SEEK_HOLE,
// st_blocks, discard, fsync, cache modes.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { childSha256, imgmount, mount, py, randomFile, run, sha256, tmpdir, mirrorWrites } from '../helpers';

// A python3 client applies the same pseudo-random unaligned writes to two files.

for (const cache of ['writeback', 'none', 'writethrough', 'unsafe']) {
  t.test(`random unaligned writes match a reference file (cache=${cache})`, async (t) => {
    const d = tmpdir(t);
    const img = path.join(d, 'disk.img');
    const ref = path.join(d, 'ref.img');
    randomFile(img, 24 << 20, 3);
    fs.copyFileSync(img, ref);
    const mnt = path.join(d, 'm');
    const m = mount(t, img, mnt, ['--cache', cache]);
    t.equal(m.code, 0, m.stderr);
    const w = mirrorWrites(11, 150, [path.join(mnt, 'disk.raw'), ref], 300000);
    t.equal(w.stdout.trim(), 'ok', `client: ${w.stderr}`);
    t.equal(childSha256(path.join(mnt, 'disk.raw')), childSha256(ref), 'mount equals reference');
    t.equal(imgmount(['unmount', mnt]).code, 0);
    t.equal(sha256(fs.readFileSync(img)), sha256(fs.readFileSync(ref)), 'image equals reference after unmount');
    t.equal(run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', img, ref]).code, 0, 'qemu-img compare: identical');
  });
}

t.test('SEEK_DATA/SEEK_HOLE, st_blocks and PUNCH_HOLE follow the allocation', async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'sparse.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 64 << 20);
  const fd = fs.openSync(img, 'r+');
  fs.writeSync(fd, Buffer.alloc(1 << 20, 0xaa), 0, 1 << 20, 8 << 20);
  fs.writeSync(fd, Buffer.alloc(4096, 0xbb), 0, 4096, 40 << 20);
  fs.closeSync(fd);
  const mnt = path.join(d, 'm');
  t.equal(mount(t, img, mnt).code, 0);
  const disk = path.join(mnt, 'disk.raw');
  const seeks = py(`
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
out = []
for off in (0, 8<<20, (8<<20)+5, 9<<20, 41<<20):
    try: out.append(os.lseek(fd, off, os.SEEK_DATA))
    except OSError as e: out.append(-e.errno)
    try: out.append(os.lseek(fd, off, os.SEEK_HOLE))
    except OSError as e: out.append(-e.errno)
print(" ".join(map(str, out)))
`, [disk]);
  t.equal(seeks.stdout.trim(), [8 << 20, 0, 8 << 20, 9 << 20, (8 << 20) + 5, 9 << 20, 40 << 20, 9 << 20, -6, 41 << 20].join(' '),
    `SEEK_DATA/SEEK_HOLE answers (${seeks.stderr})`);
  const blocks = Number(run('stat', ['-c', '%b', disk]).stdout.trim());
  t.ok(blocks >= 2056 && blocks < 4096, `st_blocks from allocation (${blocks})`);
  const punch = py(`
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(sys.argv[1], os.O_RDWR)
r = libc.fallocate(fd, 3, ctypes.c_long(8<<20), ctypes.c_long(1<<20))
print(r, ctypes.get_errno())
print(os.pread(fd, 16, (8<<20) + 100) == bytes(16))
`, [disk]);
  t.same(punch.stdout.trim().split('\n'), ['0 0', 'True'], `punch hole works and reads zeros (${punch.stderr})`);
  t.equal(imgmount(['unmount', mnt]).code, 0);
  const data = py(`
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print(os.lseek(fd, 0, os.SEEK_DATA))
`, [img]);
  t.equal(data.stdout.trim(), String(40 << 20), 'the hole was punched in the image file itself');
});

t.test('reads past the end are short, writes past the end fail, truncation is refused', async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'a.img');
  randomFile(img, 1 << 20);
  const mnt = path.join(d, 'm');
  t.equal(mount(t, img, mnt).code, 0);
  const r = py(`
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
print(len(os.pread(fd, 8192, (1<<20) - 100)))
print(len(os.pread(fd, 100, 1<<20)))
try: print(os.pwrite(fd, b"x"*10, (1<<20) + 10))
except OSError as e: print("err", e.errno)
try: os.ftruncate(fd, 10); print("truncated")
except OSError as e: print("err", e.errno)
`, [path.join(mnt, 'disk.raw')]);
  t.same(r.stdout.trim().split('\n'), ['100', '0', 'err 28', 'err 1'], r.stderr);
});

t.test('a probed raw image cannot be turned into another format through sector 0', async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'a.img');
  fs.writeFileSync(img, Buffer.alloc(1 << 20));
  const mnt = path.join(d, 'm');
  const poke = (): string => py(`
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try: os.pwrite(fd, b"QFI\\xfb\\x00\\x00\\x00\\x03", 0); print("written")
except OSError as e: print("err", e.errno)
try: os.pwrite(fd, b"plain", 100); print("written")
except OSError as e: print("err", e.errno)
`, [path.join(mnt, 'disk.raw')]).stdout.trim();
  t.equal(mount(t, img, mnt).code, 0);
  t.same(poke().split('\n'), ['err 1', 'written'], 'probed: a qcow2 magic is refused (EPERM), other writes pass');
  t.equal(imgmount(['unmount', mnt]).code, 0);
  t.equal(mount(t, img, mnt, ['-f', 'raw']).code, 0);
  t.same(poke().split('\n'), ['written', 'written'], 'with -f raw the guest may write anything');
  t.equal(imgmount(['unmount', mnt]).code, 0);
});

t.test('a probed raw image cannot grow a fixed-VHD footer either', async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'a.img');
  fs.writeFileSync(img, Buffer.alloc(2 << 20));
  const vhd = path.join(d, 'v.vpc');
  t.equal(run('qemu-img', ['create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', vhd, '1M']).code, 0);
  const footerFile = path.join(d, 'footer.bin');
  fs.writeFileSync(footerFile, fs.readFileSync(vhd).subarray(-512));
  const plant = (): string => py(`
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
footer = open(sys.argv[2], 'rb').read()
size = os.fstat(fd).st_size
try: os.pwrite(fd, footer, size - 512); print("written")
except OSError as e: print("err", e.errno)
`, [path.join(mnt, 'disk.raw'), footerFile]).stdout.trim();
  const mnt = path.join(d, 'm');
  // the same bytes in a plain file are recognised as a fixed VHD: the guard is not vacuous
  const probe = path.join(d, 'probe.img');
  fs.writeFileSync(probe, Buffer.concat([Buffer.alloc((2 << 20) - 512), fs.readFileSync(footerFile)]));
  t.equal((JSON.parse(imgmount(['info', '--output', 'json', probe]).stdout) as { format: string }).format, 'vpc', 'a footer makes a vpc');
  t.equal(mount(t, img, mnt).code, 0);
  t.equal(plant(), 'err 1', 'planting the footer through a probed raw mount is refused');
  t.equal(imgmount(['unmount', mnt]).code, 0);
  t.equal((JSON.parse(imgmount(['info', '--output', 'json', img]).stdout) as { format: string }).format, 'raw', 'still raw');
  t.equal(mount(t, img, mnt, ['-f', 'raw']).code, 0);
  t.equal(plant(), 'written', 'with -f raw the guest may write it');
  t.equal(imgmount(['unmount', mnt]).code, 0);
});
