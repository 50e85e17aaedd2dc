// Mounting what is read-only by nature (dmg, a plain fat: disk) and the fat: rules of the mount.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { imgmount, mount, py, run, sha256, tmpdir, childSha256, ROOT } from '../helpers';

t.test('a read-only format mounts read-only with a one-line notice; the image is untouched', async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'x.dmg');
  fs.copyFileSync(path.join(ROOT, 'images', 'dmg-compression-lzfse.dmg'), img);
  const before = sha256(fs.readFileSync(img));
  const mnt = path.join(d, 'm');
  const r = mount(t, img, mnt);
  t.equal(r.code, 0, r.stderr);
  t.match(r.stderr, /^imgmount: notice: .*read-only.*\n$/, 'one notice line');
  t.match(childSha256(path.join(mnt, 'disk.raw')), /^0786ad1fdcba31a3/, 'the known disk');
  const w = py('import os,sys\ntry:\n  os.open(sys.argv[1], os.O_WRONLY)\nexcept OSError as e:\n  print(e.errno)', [path.join(mnt, 'disk.raw')]);
  t.equal(w.stdout.trim(), '30', 'EROFS');
  t.equal(imgmount(['unmount', mnt]).code, 0);
  t.equal(sha256(fs.readFileSync(img)), before, 'image unchanged');
});

t.test('fat: directory as a disk: mtools reads it through the mount; -s with rw: is refused', async (t) => {
  const d = tmpdir(t);
  const dir = path.join(d, 'tree');
  fs.mkdirSync(path.join(dir, 'sub', 'deeper'), { recursive: true });
  fs.writeFileSync(path.join(dir, 'Hello World.txt'), 'hello\n');
  fs.writeFileSync(path.join(dir, 'sub', 'deeper', 'data.bin'), Buffer.alloc(100000, 7));
  const mnt = path.join(d, 'm');
  const r = mount(t, `fat:${dir}`, mnt);
  t.equal(r.code, 0, r.stderr);
  t.match(r.stderr, /read-only/);
  const out = path.join(d, 'out');
  fs.mkdirSync(out);
  // the partition starts where the MBR says; mtools takes the offset after @@
  const off = py(`
import struct, sys
b = open(sys.argv[1], 'rb').read(512)
print(struct.unpack_from('<I', b, 446 + 8)[0] * 512)
`, [path.join(mnt, 'disk.raw')]).stdout.trim();
  t.match(off, /^\d+$/, `partition offset ${off}`);
  const c = run('mcopy', ['-s', '-n', '-i', `${path.join(mnt, 'disk.raw')}@@${off}`, '::/*', out], { env: { ...process.env, MTOOLS_SKIP_CHECK: '1' } });
  t.equal(c.code, 0, c.stderr);
  t.equal(run('diff', ['-r', dir, out]).code, 0, 'mcopy -s gives back the tree');
  t.equal(imgmount(['unmount', mnt]).code, 0);
  const s = imgmount(['mount', '-s', `fat:rw:${dir}`, mnt]);
  t.equal(s.code, 1, '-s with rw: refused');
  t.match(s.stderr, /^imgmount: .*rw:/);
});
