import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { imgmount, run, tmpdir } from '../helpers';
import { openImage } from '../../lib/core/graph';
import { blockStatusAt } from '../../lib/core/io';
import { createImage } from '../../lib/ops/create';
import { errOf, have, qemuCreate, openLuksImage, PASS, qemuLuksRaw, randomWrites, readAll, secrets, sh } from './helpers';

const peers = have('qemu-img') && have('qemu-io');
const SIZE = 4 << 20;
const OBJ = `secret,id=s,data=${PASS}`;
const spec = (img: string): string => `driver=qcow2,encrypt.key-secret=s,file.filename=${img}`;

function qemuWrite(img: string, cmds: string[]): void {
  sh('qemu-io', ['--object', OBJ, '--image-opts', spec(img), ...cmds.flatMap((c) => ['-c', c])]);
}
function qemuCheck(img: string): string {
  return sh('qemu-img', ['check', '--object', OBJ, '--image-opts', spec(img)]);
}
const openQ = (img: string, rw = false) => openLuksImage(img, !rw, PASS, 'encrypt.key-secret');

for (const fmt of ['luks', 'aes'] as const) {
  t.test(`qemu-made qcow2 encrypt.format=${fmt}: read, write, check`, { skip: peers ? false : 'qemu-img/qemu-io missing' }, async (t) => {
    const dir = tmpdir(t);
    const img = path.join(dir, 'q.qcow2');
    qemuCreate(['-f', 'qcow2', '--object', OBJ, '-o', `encrypt.format=${fmt},encrypt.key-secret=s${fmt === 'luks' ? ',encrypt.iter-time=10' : ''},cluster_size=4k`, img, String(SIZE)]);
    qemuWrite(img, ['write -P 0xab 64k 64k', 'write -P 0x12 1M 3k', 'write -z 2M 8k', 'write -P 0x5a 3M 100k']);
    const ref = qemuLuksRaw(dir, img, PASS, 'qcow2');
    const n = await openQ(img, true);
    t.ok((await readAll(n)).equals(ref), 'reads what qemu wrote');
    const st = await blockStatusAt(n, 64 * 1024, 4096);
    t.equal(st.state, 'data');
    if (fmt === 'luks') {
      // LUKS IVs follow host offsets: the native path can decrypt the cluster in place
      t.match(st.host, { crypt: { cipher: 'aes-256-xts', ivBase: 0, ivBits: 64, sectorSize: 512 } }, 'LUKS data maps to the host with its cipher');
    } else {
      t.equal(st.host, undefined, 'legacy AES (guest-offset IVs) has no host mapping');
    }
    await randomWrites(n, ref, 11);
    await n.close();
    t.match(qemuCheck(img), /No errors were found/, 'qemu-img check clean');
    t.ok(qemuLuksRaw(dir, img, PASS, 'qcow2').equals(ref), 'qemu reads what we wrote');
    const wrong = await errOf(openLuksImage(img, true, fmt === 'luks' ? 'nope' : PASS + 'x', 'encrypt.key-secret'));
    if (fmt === 'luks') t.same(wrong, { kind: 'crypto', message: 'Invalid password, cannot unlock any keyslot' });
    const missing = await errOf(openImage(img, { readOnly: true }));
    t.equal(missing.kind, 'crypto');
    t.match(missing.message, /needs a secret: --object secret,id=sec0,file=PASSFILE -o encrypt.key-secret=sec0/);
  });
}

const createCases = [
  'encrypt.format=luks',
  'encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha1',
  'encrypt.format=luks,compat=0.10,cluster_size=512',
  'encrypt.format=luks,extended_l2=on,cluster_size=32k',
  'encrypt.format=aes',
  'encryption=on',
];
for (const opts of createCases) {
  t.test(`create qcow2 ${opts}: qemu agrees`, { skip: peers ? false : 'qemu-img/qemu-io missing' }, async (t) => {
    const dir = tmpdir(t);
    const img = path.join(dir, 'm.qcow2');
    const kv = [...opts.split(','), 'encrypt.key-secret=sec0'];
    if (opts.includes('luks')) kv.push('encrypt.iter-time=10');
    const options: Record<string, unknown> = {};
    for (const p of kv) {
      const [k, v] = p.split('=');
      const [a, b] = k.split('.');
      if (b) { options[a] = { ...(options[a] as object ?? {}), [b]: v }; } else options[a] = v;
    }
    await createImage({ format: 'qcow2', filename: img, size: SIZE, secrets: secrets(), options: options as never });
    t.match(qemuCheck(img), /No errors were found/, 'qemu-img check clean after create');
    const info = JSON.parse(sh('qemu-img', ['info', '--output=json', '--object', OBJ, '--image-opts', spec(img)]));
    t.equal(info.encrypted, true, 'qemu: encrypted');
    t.equal(info['format-specific'].data.encrypt.format, opts.includes('luks') ? 'luks' : 'aes');
    qemuWrite(img, ['write -P 0x11 0 100k', 'write -P 0x22 2M 64k']);
    const ref = qemuLuksRaw(dir, img, PASS, 'qcow2');
    const n = await openQ(img, true);
    t.ok((await readAll(n)).equals(ref), 'we read what qemu wrote');
    await randomWrites(n, ref, 5, 8);
    await n.close();
    t.match(qemuCheck(img), /No errors were found/, 'qemu-img check clean after our writes');
    t.ok(qemuLuksRaw(dir, img, PASS, 'qcow2').equals(ref), 'qemu reads what we wrote');
  });
}

t.test('CLI: legacy AES creation warns once; wrong secret exits 4', { skip: peers ? false : 'qemu-img missing' }, async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'a.qcow2');
  const r = imgmount(['create', '-f', 'qcow2', '--object', OBJ, '-o', 'encrypt.format=aes,encrypt.key-secret=s', img, '1M']);
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stderr.trim().split('\n').filter((l) => /deprecated/.test(l)).length, 1, 'one deprecation line');
  const l = path.join(dir, 'l.qcow2');
  t.equal(imgmount(['create', '-f', 'qcow2', '--object', OBJ, '-o', 'encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10', l, '1M']).code, 0);
  const bad = imgmount(['info', '--object', 'secret,id=s,data=wrong', '--image-opts', spec(l)]);
  t.equal(bad.code, 4);
  t.equal(bad.stderr.trim(), 'imgmount: Invalid password, cannot unlock any keyslot');
  // info needs no secret (qemu-img shows the LUKS header locked); reading data does
  for (const f of [l, img]) {
    for (const out of [[], ['--output', 'json']]) {
      const ours = imgmount(['info', ...out, f]);
      t.equal(ours.code, 0, `info ${out.join(' ')} without a secret: ${ours.stderr}`);
      t.equal(ours.stdout, run('qemu-img', ['info', ...out, f]).stdout, `info ${out.join(' ')} of ${path.basename(f)} equals qemu-img's`);
    }
  }
  const none = imgmount(['convert', '-O', 'raw', l, path.join(dir, 'out.raw')]);
  t.equal(none.code, 4, 'reading without the secret exits 4');
  t.match(none.stderr, /needs a secret/);
  t.notOk(fs.readFileSync(l).includes(Buffer.from(PASS)), 'the passphrase is not stored in the image');
});

t.test('CLI convert into luks and qcow2+luks opens the target with the creation secret', { skip: peers ? false : 'qemu-img missing' }, async (t) => {
  const dir = tmpdir(t);
  const src = path.join(dir, 'src.raw');
  const data = Buffer.alloc(1 << 20);
  for (let i = 0; i < data.length; i += 4096) data.writeUInt32LE(i + 1, i);
  fs.writeFileSync(src, data);
  const targets: [string, string, string][] = [
    ['luks', 'key-secret=s,iter-time=10', 'driver=luks,key-secret=s'],
    ['qcow2', 'encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10', 'driver=qcow2,encrypt.key-secret=s'],
  ];
  for (const [fmt, o, open] of targets) {
    const dst = path.join(dir, `out.${fmt}`);
    const r = imgmount(['convert', '--object', OBJ, '-f', 'raw', '-O', fmt, '-o', o, src, dst]);
    t.equal(r.code, 0, `${fmt}: ${r.stderr}`);
    const cmp = sh('qemu-img', ['compare', '--object', OBJ, '--image-opts', `${open},file.filename=${dst}`, `driver=raw,file.filename=${src}`]);
    t.match(cmp, /identical/, `${fmt}: qemu-img compare`);
  }
});
