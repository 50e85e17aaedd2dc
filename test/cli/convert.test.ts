// convert in both directions, compressed output checked by qemu-img.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { imgmount, randomFile, run, tmpdir } from '../helpers';

function mixedSource(d: string): string {
  const src = path.join(d, 'src.raw');
  randomFile(src, 3 << 20, 4);
  const fd = fs.openSync(src, 'r+');
  fs.writeSync(fd, Buffer.from('compressible text '.repeat(60000)), 0, undefined, 1 << 20);
  fs.writeSync(fd, Buffer.alloc(300000), 0, 300000, 2 << 20);
  fs.closeSync(fd);
  return src;
}

for (const opts of ['compression_type=zlib', 'compression_type=zstd', 'cluster_size=16384,extended_l2=on', 'compat=0.10']) {
  t.test(`convert -c -O qcow2 -o ${opts}`, async (t) => {
    const d = tmpdir(t);
    const src = mixedSource(d);
    const dst = path.join(d, 'c.qcow2');
    const r = imgmount(['convert', '-c', '-O', 'qcow2', '-o', opts, src, dst]);
    t.equal(r.code, 0, r.stderr);
    const c = run('qemu-img', ['check', dst]);
    t.equal(c.code, 0, c.stdout);
    const pct = /(\d+\.\d+)% compressed clusters/.exec(c.stdout);
    t.ok(pct && Number(pct[1]) > 20, `clusters were compressed (${pct?.[1]}%)`);
    t.equal(run('qemu-img', ['compare', '-f', 'raw', src, dst]).stdout.trim(), 'Images are identical.');
    t.ok(fs.statSync(dst).size < fs.statSync(src).size, 'smaller than the source');
    // and back: our reader on qemu's view of our compressed clusters
    const back = path.join(d, 'back.raw');
    t.equal(imgmount(['convert', '-O', 'raw', dst, back]).code, 0);
    t.equal(run('cmp', [src, back]).code, 0, 'round trip is byte-identical');
  });
}

t.test('qemu-img convert -c output reads identically; convert -c to raw is refused', async (t) => {
  const d = tmpdir(t);
  const src = mixedSource(d);
  const q = path.join(d, 'q.qcow2');
  t.equal(run('qemu-img', ['convert', '-c', '-O', 'qcow2', src, q]).code, 0);
  const out = path.join(d, 'out.raw');
  t.equal(imgmount(['convert', '-f', 'qcow2', '-O', 'raw', '-p', q, out]).code, 0);
  t.equal(run('cmp', [src, out]).code, 0);
  const r = imgmount(['convert', '-c', '-O', 'raw', src, path.join(d, 'x.raw')]);
  t.equal(r.code, 1);
  t.match(r.stderr, /Compression not supported/);
  t.notOk(fs.existsSync(path.join(d, 'x.raw')));
});

t.test('convert keeps every byte of images whose size is not a multiple of the copy window', async (t) => {
  const d = tmpdir(t);
  for (const size of [1, 307200, 1049088, 1355776, 5000000]) {
    const src = path.join(d, `s${size}.raw`);
    randomFile(src, Math.ceil(size / 4) * 4, size);
    fs.truncateSync(src, size);
    for (const fmt of ['raw', 'qcow2', 'vmdk', 'vdi']) {
      const dst = path.join(d, `t${size}.${fmt}`);
      const r = imgmount(['convert', '-f', 'raw', '-O', fmt, src, dst]);
      t.equal(r.code, 0, `${fmt} ${size}: ${r.stderr}`);
      const c = run('qemu-img', ['compare', '-f', 'raw', '-F', fmt, src, dst]);
      t.equal(c.code, 0, `${fmt}, ${size} bytes: ${c.stdout.trim()}`);
    }
  }
});
