// qcow, qed, vdi and parallels through the FUSE mount: the native fast path serves allocated
// clusters straight from the image file, everything else goes through the drivers.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { childSha256, imgmount, mount, py, run, tmpdir, mirrorWrites } from '../helpers';


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
    const w = mirrorWrites(7, 60, [path.join(mnt, 'disk.raw'), ref], 100000);
    t.equal(w.stdout.trim(), 'ok', `client: ${w.stderr}`);
    t.equal(childSha256(path.join(mnt, 'disk.raw')), childSha256(ref), 'mount equals the reference');
    t.equal(imgmount(['unmount', mnt]).code, 0, 'unmount');
    const chk = run('qemu-img', ['check', '-f', fmt, img]);
    t.equal(chk.code, fmt === 'qcow' ? 63 : 0, `qemu-img check: ${chk.stdout}${chk.stderr}`);
    const cmp = run('qemu-img', ['compare', '-f', fmt, '-F', 'raw', img, ref]);
    t.equal(cmp.code, 0, `qemu-img compare: ${cmp.stdout}${cmp.stderr}`);
  });
}
