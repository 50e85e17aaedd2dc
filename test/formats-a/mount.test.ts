// qcow, qed, vdi and parallels through the FUSE mount: the native fast path serves allocated
// clusters straight from the image file, everything else goes through the drivers.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { childSha256, imgmount, mount, py, run, tmpdir } from '../helpers';

const WRITER = `
import os, random, sys
seed, n = int(sys.argv[1]), int(sys.argv[2])
files = sys.argv[3:]
fds = [os.open(f, os.O_RDWR) for f in files]
size = os.fstat(fds[0]).st_size
r = random.Random(seed)
for i in range(n):
    off = r.randrange(0, size - 1)
    ln = r.randrange(1, min(100000, size - off) + 1)
    data = (bytes(r.getrandbits(8) for _ in range(61)) * (ln // 61 + 1))[:ln]
    for fd in fds:
        assert os.pwrite(fd, data, off) == ln
    o2 = r.randrange(0, size - 1); l2 = r.randrange(1, min(100000, size - o2) + 1)
    assert os.pread(fds[0], l2, o2) == os.pread(fds[1], l2, o2), "mismatch at %d+%d" % (o2, l2)
    if i % 40 == 0:
        os.fsync(fds[0])
for fd in fds:
    os.fsync(fd); os.close(fd)
print("ok")
`;

const fuse = fs.existsSync('/dev/fuse');
const formats: Array<[string, string[]]> = [
  ['qed', ['-o', 'cluster_size=4k']], ['vdi', []], ['qcow', []], ['parallels', ['-o', 'cluster_size=64k']],
];

for (const [fmt, opts] of formats) {
  t.test(`${fmt}: random I/O through the mount, then qemu-img check and compare`, { skip: fuse ? false : 'no /dev/fuse' }, async (t) => {
    const d = tmpdir(t);
    const img = path.join(d, `disk.${fmt}`);
    const ref = path.join(d, 'ref.raw');
    t.equal(run('qemu-img', ['create', '-q', '-f', fmt, ...opts, img, '6M']).code, 0, 'qemu-img create');
    t.equal(run('qemu-io', ['-f', fmt, '-c', 'write -P 0x11 0 1M', img]).code, 0, 'qemu-io write');
    const b = Buffer.alloc(6 << 20);
    b.fill(0x11, 0, 1 << 20);
    fs.writeFileSync(ref, b);
    const mnt = path.join(d, 'm');
    const m = mount(t, img, mnt, ['-f', fmt]);
    t.equal(m.code, 0, `mount: ${m.stderr}`);
    if (m.code !== 0) return;
    const w = py(WRITER, ['7', '60', path.join(mnt, 'disk.raw'), ref]);
    t.equal(w.stdout.trim(), 'ok', `client: ${w.stderr}`);
    t.equal(childSha256(path.join(mnt, 'disk.raw')), childSha256(ref), 'mount equals the reference');
    t.equal(imgmount(['unmount', mnt]).code, 0, 'unmount');
    const chk = run('qemu-img', ['check', '-f', fmt, img]);
    t.equal(chk.code, fmt === 'qcow' ? 63 : 0, `qemu-img check: ${chk.stdout}${chk.stderr}`);
    const cmp = run('qemu-img', ['compare', '-f', fmt, '-F', 'raw', img, ref]);
    t.equal(cmp.code, 0, `qemu-img compare: ${cmp.stdout}${cmp.stderr}`);
  });
}
