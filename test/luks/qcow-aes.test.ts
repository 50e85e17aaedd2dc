import t from 'tap';
import path from 'node:path';
import { imgmount, tmpdir } from '../helpers';
import { openImage } from '../../lib/core/graph';
import { blockStatusAt } from '../../lib/core/io';
import { createImage } from '../../lib/ops/create';
import { errOf, have, PASS, randomWrites, readAll, secrets, sh } from './helpers';
import fs from 'node:fs';

const peers = have('qemu-img') && have('qemu-io');
const OBJ = `secret,id=s,data=${PASS}`;
const spec = (img: string): string => `driver=qcow,encrypt.key-secret=s,file.filename=${img}`;
const qemuView = (dir: string, img: string): Buffer => {
  const out = path.join(dir, `v-${Math.random().toString(36).slice(2)}.raw`);
  sh('qemu-img', ['convert', '--object', OBJ, '--image-opts', spec(img), '-O', 'raw', out]);
  return fs.readFileSync(out);
};
const open = (img: string, rw: boolean, pass = PASS) =>
  openImage(img, { readOnly: !rw, secrets: secrets(pass), options: { encrypt: { 'key-secret': 'sec0' } } });

t.test('qcow v1 AES made by qemu: read, write; ours read by qemu', { skip: peers ? false : 'qemu-img/qemu-io missing' }, async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'q.qcow');
  sh('qemu-img', ['create', '-f', 'qcow', '--object', OBJ, '-o', 'encrypt.format=aes,encrypt.key-secret=s', img, '4M']);
  sh('qemu-io', ['--object', OBJ, '--image-opts', spec(img), '-c', 'write -P 0xab 64k 64k', '-c', 'write -P 0x12 1M 3k']);
  const ref = qemuView(dir, img);
  const n = await open(img, true);
  t.ok((await readAll(n)).equals(ref), 'reads what qemu wrote');
  t.equal((await blockStatusAt(n, 64 * 1024, 4096)).host, undefined, 'no host mapping for encrypted data');
  await randomWrites(n, ref, 21, 8);
  await n.close();
  t.ok(qemuView(dir, img).equals(ref), 'qemu reads what we wrote');
  const missing = await errOf(openImage(img, { readOnly: true }));
  t.equal(missing.kind, 'crypto');
  t.match(missing.message, /needs a secret/);
});

t.test('qcow v1 AES created here (encryption=on): qemu reads and writes it', { skip: peers ? false : 'qemu-img/qemu-io missing' }, async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'm.qcow');
  await createImage({ format: 'qcow', filename: img, size: 2 << 20, secrets: secrets(), options: { encryption: 'on', encrypt: { 'key-secret': 'sec0' } } });
  const info = JSON.parse(sh('qemu-img', ['info', '--output=json', '--object', OBJ, '--image-opts', spec(img)]));
  t.equal(info.encrypted, true, 'qemu: encrypted');
  sh('qemu-io', ['--object', OBJ, '--image-opts', spec(img), '-c', 'write -P 0x33 4k 100k']);
  const ref = qemuView(dir, img);
  const n = await open(img, true);
  t.ok((await readAll(n)).equals(ref), 'we read what qemu wrote');
  await randomWrites(n, ref, 2, 6);
  await n.close();
  t.ok(qemuView(dir, img).equals(ref), 'qemu reads what we wrote');
  const r = imgmount(['create', '-f', 'qcow', '--object', OBJ, '-o', 'encryption=on,encrypt.key-secret=s', path.join(dir, 'c.qcow'), '1M']);
  t.equal(r.code, 0, r.stderr);
  t.equal(r.stderr.split('\n').filter((l) => /deprecated/.test(l)).length, 1, 'one deprecation warning line');
});
