// The image tool on raw: create with preallocation, info/map JSON as qemu-img, convert,
// compare, json: and --image-opts, error classes.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { imgmount, mount, randomFile, run, tmpdir, childSha256, sha256 } from '../helpers';

t.test('create -f raw with each preallocation mode', async (t) => {
  const d = tmpdir(t);
  for (const [mode, minBlocks] of [['off', 0], ['falloc', 2048], ['full', 2048]] as const) {
    const f = path.join(d, `${mode}.raw`);
    const r = imgmount(['create', '-f', 'raw', '-o', `preallocation=${mode}`, f, '1M']);
    t.equal(r.code, 0, `create ${mode}: ${r.stderr}`);
    const st = fs.statSync(f);
    t.equal(st.size, 1 << 20);
    if (mode === 'off') t.equal(st.blocks, 0, 'off: sparse');
    else t.ok(st.blocks >= minBlocks, `${mode}: allocated (${st.blocks} blocks)`);
    const q = JSON.parse(run('qemu-img', ['info', '--output', 'json', f]).stdout) as Record<string, unknown>;
    t.equal(q['virtual-size'], 1 << 20, 'qemu-img agrees on the size');
  }
  const bad = imgmount(['create', '-f', 'raw', '-o', 'preallocation=bogus', path.join(d, 'x.raw'), '1M']);
  t.equal(bad.code, 1);
  t.notOk(fs.existsSync(path.join(d, 'x.raw')), 'a failed create leaves no file');
  t.equal(imgmount(['create', '-f', 'raw', path.join(d, 'y.raw'), '2G']).code, 0);
  t.equal(fs.statSync(path.join(d, 'y.raw')).size, 2 * 1024 ** 3, 'size suffix G');
});

t.test('info and map JSON equal qemu-img\'s', async (t) => {
  const d = tmpdir(t);
  const f = path.join(d, 'a.raw');
  fs.writeFileSync(f, '');
  fs.truncateSync(f, 16 << 20);
  const fd = fs.openSync(f, 'r+');
  fs.writeSync(fd, Buffer.alloc(65536, 1), 0, 65536, 1 << 20);
  fs.closeSync(fd);
  const ours = JSON.parse(imgmount(['info', '--output', 'json', f]).stdout) as Record<string, unknown>;
  const theirs = JSON.parse(run('qemu-img', ['info', '--output', 'json', f]).stdout) as Record<string, unknown>;
  t.same(ours, theirs, 'info --output json');
  const ourMap = JSON.parse(imgmount(['map', '--output', 'json', f]).stdout) as unknown;
  const theirMap = JSON.parse(run('qemu-img', ['map', '--output', 'json', f]).stdout) as unknown;
  t.same(ourMap, theirMap, 'map --output json');
  const human = imgmount(['info', f]).stdout;
  t.match(human, /^image: .*a\.raw\nfile format: raw\nvirtual size: 16 MiB \(16777216 bytes\)\ndisk size: /);
});

t.test('convert raw to raw, compare, and raw offset/size options', async (t) => {
  const d = tmpdir(t);
  const src = path.join(d, 'src.raw');
  const data = randomFile(src, 4 << 20, 5);
  const dst = path.join(d, 'dst.raw');
  const c = imgmount(['convert', '-O', 'raw', src, dst]);
  t.equal(c.code, 0, c.stderr);
  t.equal(sha256(fs.readFileSync(dst)), sha256(data));
  t.equal(imgmount(['compare', src, dst]).stdout.trim(), 'Images are identical.');
  const fd = fs.openSync(dst, 'r+');
  fs.writeSync(fd, Buffer.from([0x55]), 0, 1, 3000);
  fs.closeSync(fd);
  const diff = imgmount(['compare', src, dst]);
  t.equal(diff.code, 1);
  t.equal(diff.stdout.trim(), 'Content mismatch at offset 2560!', 'offset of the differing sector, as qemu-img');
  t.equal(run('qemu-img', ['compare', src, dst]).stdout.trim(), 'Content mismatch at offset 2560!');
  // a window of the file via raw's offset/size options, in three spellings
  const win = path.join(d, 'win.raw');
  const spellings = [
    ['-f', 'raw', '-o', 'offset=1M,size=2M', src],
    ['--image-opts', `driver=raw,offset=1M,size=2M,file.driver=file,file.filename=${src}`],
    [`json:{"driver":"raw","offset":1048576,"size":2097152,"file":{"driver":"file","filename":"${src}"}}`],
  ];
  for (const s of spellings) {
    fs.rmSync(win, { force: true });
    const r = imgmount(['convert', '-O', 'raw', ...s.slice(0, -1), s[s.length - 1], win]);
    // convert has no -o for the source: the option string forms are what it takes
    if (s[0] === '-f') { t.not(r.code, 0, 'convert -o applies to the output, so offset= is refused for raw output'); continue; }
    t.equal(r.code, 0, `${s[0]}: ${r.stderr}`);
    t.equal(sha256(fs.readFileSync(win)), sha256(data.subarray(1 << 20, 3 << 20)), `window read via ${s[0].slice(0, 12)}`);
  }
  const mnt = path.join(d, 'm');
  t.equal(mount(t, src, mnt, ['-r', '-o', 'offset=1M,size=2M']).code, 0);
  t.equal(childSha256(path.join(mnt, 'disk.raw')), sha256(data.subarray(1 << 20, 3 << 20)), 'mount -o offset,size');
  t.equal(imgmount(['unmount', mnt]).code, 0);
});

t.test('error classes and their exit codes', async (t) => {
  const d = tmpdir(t);
  const junk = path.join(d, 'junk.qcow2');
  fs.writeFileSync(junk, Buffer.alloc(65536, 0x42));
  const j = imgmount(['info', '-f', 'qcow2', junk]);
  t.equal(j.code, 2, 'junk opened as qcow2: exit 2');
  t.match(j.stderr, /^imgmount: .*\n$/);
  t.equal(j.stderr.split('\n').length, 2, 'one line');
  const m = imgmount(['info', path.join(d, 'nothere')]);
  t.equal(m.code, 1, 'missing image: exit 1');
  const u = imgmount(['info', '--bogus=1', junk]);
  t.equal(u.code, 1, 'unknown option: exit 1');
  t.match(u.stderr, /Unknown argument/);
  const v = imgmount(['info', '-f', 'nosuchformat', junk]);
  t.equal(v.code, 1);
  t.match(v.stderr, /Unknown driver 'nosuchformat'/);
  const n = imgmount(['info', 'nbd://localhost/x']);
  t.equal(n.code, 2, 'network sources: a clear unsupported error');
  t.match(n.stderr, /not supported yet/);
  const h = imgmount(['mount', '--help']);
  t.equal(h.code, 0);
  t.match(h.stdout, /--load-snapshot/);
  for (const cmd of ['unmount', 'create', 'info', 'check', 'map', 'compare', 'snapshot', 'commit', 'convert']) {
    t.equal(imgmount([cmd, '--help']).code, 0, `${cmd} --help`);
  }
  const raw = path.join(d, 'r.raw');
  randomFile(raw, 65536);
  const c = imgmount(['check', raw]);
  t.equal(c.code, 63, 'check on raw: like qemu-img, exit 63');
  const s = imgmount(['snapshot', '-c', 'x', raw]);
  t.equal(s.code, 2);
  t.match(s.stderr, /does not support internal snapshots/);
});

t.test('qcow2 sample: info (with chain), map and check output equal qemu-img\'s', async (t) => {
  const d = tmpdir(t);
  for (const f of ['sample.qcow2', 'sample-base.qcow2']) fs.copyFileSync(path.join(__dirname, '..', '..', '..', 'images', f), path.join(d, f));
  const img = path.join(d, 'sample.qcow2');
  const pairs: Array<[string[], string[]]> = [
    [['info', '--output', 'json', '--backing-chain', img], ['info', '--output', 'json', '--backing-chain', img]],
    [['info', img], ['info', img]],
    [['map', '--output', 'json', img], ['map', '--output', 'json', img]],
    [['map', img], ['map', img]],
    [['check', '--output', 'json', img], ['check', '--output', 'json', img]],
    [['check', img], ['check', img]],
  ];
  for (const [ours, theirs] of pairs) {
    const a = imgmount(ours);
    const b = run('qemu-img', theirs);
    t.equal(a.code, b.code, `${ours.join(' ')}: same exit code`);
    t.equal(a.stdout, b.stdout, `${ours.slice(0, 3).join(' ')}: same output`);
  }
  // a leaked cluster: check exits 3 like qemu-img, and -r leaks repairs it
  const leaky = path.join(d, 'leaky.qcow2');
  run('qemu-img', ['create', '-f', 'qcow2', leaky, '1M']);
  const buf = fs.readFileSync(leaky);
  const refTable = Number(buf.readBigUInt64BE(48));
  const refBlock = Number(buf.readBigUInt64BE(refTable));
  buf.writeUInt16BE(1, refBlock + 2 * 10); // cluster 10 gets a reference nobody uses
  fs.writeFileSync(leaky, Buffer.concat([buf, Buffer.alloc(11 * 65536 - buf.length)]));
  const q = run('qemu-img', ['check', leaky]);
  const ours = imgmount(['check', leaky]);
  t.equal(q.code, 3, 'qemu-img sees a leak');
  t.equal(ours.code, 3, 'so do we');
  t.equal(imgmount(['check', '-r', 'leaks', leaky]).code, 0, 'repaired');
  t.equal(run('qemu-img', ['check', leaky]).code, 0, 'qemu-img agrees it is clean');
});

t.test('an empty file probes as raw', async (t) => {
  const d = tmpdir(t);
  const f = path.join(d, 'empty.img');
  fs.writeFileSync(f, '');
  const r = imgmount(['info', '--output', 'json', f]);
  t.equal(r.code, 0, r.stderr);
  t.equal((JSON.parse(r.stdout) as { format: string }).format, 'raw');
});

t.test('info on a LUKS image without its secret shows the header like qemu-img; reading needs the secret', async (t) => {
  const d = tmpdir(t);
  const img = path.join(d, 'a.luks');
  // qemu's PBKDF timing fails at random on a busy machine ("Unable to get accurate CPU usage")
  let created = -1;
  for (let i = 0; i < 30 && created !== 0; i++) {
    created = run('qemu-img', ['create', '-q', '-f', 'luks', '--object', 'secret,id=s,data=pw', '-o',
      'key-secret=s,iter-time=100,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256', img, '4M']).code;
  }
  t.equal(created, 0, 'qemu-img created the LUKS image');
  for (const args of [['info', '--output', 'json', img], ['info', img]]) {
    const a = imgmount(args);
    t.equal(a.code, 0, a.stderr);
    t.equal(a.stdout, run('qemu-img', args).stdout, `${args.join(' ')} equals qemu-img`);
  }
  const c = imgmount(['convert', '-O', 'raw', img, path.join(d, 'x.raw')]);
  t.equal(c.code, 4, 'reading without the secret: exit 4');
  t.match(c.stderr, /needs a secret: --object secret/);
  t.notOk(fs.existsSync(path.join(d, 'x.raw')));
});
