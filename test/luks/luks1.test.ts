import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { tmpdir } from '../helpers';
import { createImage } from '../../lib/ops/create';
import { cryptsetupFormat, have, qemuCreate, openLuksImage, PASS, passFile, qemuLuksRaw, randomWrites, readAll, secrets, sh } from './helpers';

const peers = have('cryptsetup') && have('qemu-img');
/** cryptsetup runs keyslot crypto in the kernel: twofish and serpent need the kernel's modules */
const kernelCrypto = fs.existsSync('/proc/crypto') ? fs.readFileSync('/proc/crypto', 'utf8') : '';
const kernelHas = (alg: string): boolean => alg === 'aes' || new RegExp(`name\\s*:\\s*${alg}\\b`).test(kernelCrypto);
const SIZE = 4 << 20;
const CSIZE = 1 << 20;

const csCases: { name: string; args: string[] }[] = [
  { name: 'aes-xts-plain64', args: ['--cipher', 'aes-xts-plain64', '--key-size', '512'] },
  { name: 'aes-xts-plain64 256-bit', args: ['--cipher', 'aes-xts-plain64', '--key-size', '256'] },
  { name: 'aes-cbc-essiv:sha256', args: ['--cipher', 'aes-cbc-essiv:sha256', '--key-size', '256'] },
  { name: 'aes-cbc-plain sha1', args: ['--cipher', 'aes-cbc-plain', '--key-size', '128', '--hash', 'sha1'] },
  { name: 'serpent-xts-plain64', args: ['--cipher', 'serpent-xts-plain64', '--key-size', '512'] },
  { name: 'twofish-xts-plain64', args: ['--cipher', 'twofish-xts-plain64', '--key-size', '256'] },
  { name: 'twofish-cbc-essiv:sha256', args: ['--cipher', 'twofish-cbc-essiv:sha256', '--key-size', '256'] },
];

for (const c of csCases) {
  const alg = c.name.split('-')[0];
  const skip = !peers ? 'cryptsetup or qemu-img missing' : !kernelHas(alg) ? `the kernel has no ${alg} (cryptsetup needs it; qemu-made ${alg} images are tested below)` : false;
  t.test(`cryptsetup LUKS1 ${c.name}: read and write like qemu`, { skip }, async (t) => {
    const dir = tmpdir(t);
    const img = path.join(dir, 'c.luks');
    cryptsetupFormat(dir, img, SIZE, ['--type', 'luks1', '--pbkdf-force-iterations', '1000', ...c.args]);
    // fill the payload through qemu so the content is not all zeros
    const kf = passFile(dir);
    const src = path.join(dir, 'src.raw');
    const ref = qemuLuksRaw(dir, img);
    for (let i = 0; i < ref.length; i += 4096) ref.writeUInt32LE(i * 2654435761 >>> 0, i);
    fs.writeFileSync(src, ref);
    sh('qemu-img', ['convert', '-n', '--object', `secret,id=s,file=${kf}`, '-f', 'raw', src, '--target-image-opts', `driver=luks,key-secret=s,file.filename=${img}`]);
    const n = await openLuksImage(img, false);
    t.equal(n.size, ref.length, 'size as qemu');
    t.ok((await readAll(n)).equals(ref), 'reads what qemu wrote');
    await randomWrites(n, ref, 7);
    await n.close();
    t.ok(qemuLuksRaw(dir, img).equals(ref), 'qemu reads what we wrote');
    sh('cryptsetup', ['open', '--test-passphrase', '--key-file', kf, img]);
  });
}

const createCases: string[] = [
  '',
  'cipher-alg=aes-128,hash-alg=sha1',
  'cipher-alg=aes-192,cipher-mode=xts,hash-alg=sha224',
  'cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha384',
  'cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=plain,hash-alg=sha512',
  'cipher-alg=aes-256,cipher-mode=ecb,hash-alg=ripemd160',
  'cipher-alg=aes-256,cipher-mode=ctr,ivgen-alg=plain64',
  'cipher-alg=twofish-256',
  'cipher-alg=serpent-128,cipher-mode=cbc,ivgen-alg=essiv',
  'preallocation=full',
];

for (const opts of createCases) {
  t.test(`create luks ${opts || '(defaults)'}: qemu and cryptsetup agree`, { skip: peers ? false : 'cryptsetup or qemu-img missing' }, async (t) => {
    const dir = tmpdir(t);
    const img = path.join(dir, 'm.luks');
    await createImage({ format: 'luks', filename: img, size: CSIZE, secrets: secrets(),
      options: Object.fromEntries(['key-secret=sec0', 'iter-time=10', ...(opts ? opts.split(',') : [])].map((kv) => kv.split('='))) });
    const kf = passFile(dir);
    const info = JSON.parse(sh('qemu-img', ['info', '--output=json', '--object', `secret,id=s,file=${kf}`, '--image-opts', `driver=luks,key-secret=s,file.filename=${img}`]));
    t.equal(info['virtual-size'], CSIZE, 'qemu sees the size');
    const fs_ = info['format-specific'].data;
    for (const kv of opts.split(',').filter((x) => x && !x.startsWith('preallocation'))) {
      const [k, v] = kv.split('=');
      t.equal(String(fs_[k]), v, `qemu reports ${k}=${v}`);
    }
    if (opts.includes('preallocation=full')) t.ok(fs.statSync(img).blocks * 512 >= CSIZE, 'preallocated');
    // cryptsetup understands the header (it has no ctr mode; dm-crypt has ecb, but not as LUKS mode string with ivgen)
    const dump = sh('cryptsetup', ['luksDump', img]);
    t.match(dump, /Version:\s+1/, 'luksDump reads it');
    // dm-crypt has no ctr mode nor "ecb-plain64" (what qemu writes); aes-192 xts makes cryptsetup fall back to device-mapper (absent here)
    const alg = /cipher-alg=(\w+)/.exec(opts)?.[1] ?? 'aes';
    if (!/ctr|ecb|aes-192/.test(opts) && kernelHas(alg)) sh('cryptsetup', ['open', '--test-passphrase', '--key-file', kf, img]);
    // qemu writes, we read; we write, qemu reads
    const ref = Buffer.alloc(CSIZE);
    for (let i = 0; i < CSIZE; i += 512) ref.writeUInt32BE((i / 512) * 7919, i);
    const src = path.join(dir, 'src.raw');
    fs.writeFileSync(src, ref);
    sh('qemu-img', ['convert', '-n', '--object', `secret,id=s,file=${kf}`, '-f', 'raw', src, '--target-image-opts', `driver=luks,key-secret=s,file.filename=${img}`]);
    const n = await openLuksImage(img, false);
    t.ok((await readAll(n)).equals(ref), 'we read what qemu wrote');
    await randomWrites(n, ref, 3, 6);
    await n.close();
    t.ok(qemuLuksRaw(dir, img).equals(ref), 'qemu reads what we wrote');
  });
}

t.test('qemu-img created luks opens; secrets: wrong, missing, unknown id', { skip: peers ? false : 'qemu-img missing' }, async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'q.luks');
  qemuCreate(['-f', 'luks', '--object', `secret,id=s,data=${PASS}`, '-o', 'key-secret=s,iter-time=10', img, '1M']);
  const n = await openLuksImage(img);
  t.equal(n.size, 1 << 20);
  t.ok((await readAll(n)).equals(qemuLuksRaw(dir, img)), 'reads as qemu does');
  await n.close();
  const { errOf } = await import('./helpers');
  const wrong = await errOf(openLuksImage(img, true, 'nope'));
  t.same(wrong, { kind: 'crypto', message: 'Invalid password, cannot unlock any keyslot' });
  const { openImage } = await import('../../lib/core/graph');
  const missing = await errOf(openImage(img, { readOnly: true }));
  t.equal(missing.kind, 'crypto');
  t.match(missing.message, /needs a secret: --object secret,id=sec0,file=PASSFILE -o key-secret=sec0/);
  const unknown = await errOf(openImage(img, { readOnly: true, options: { 'key-secret': 'nosuch' } }));
  t.equal(unknown.kind, 'crypto');
  t.match(unknown.message, /nosuch/);
});

for (const o of ['cipher-alg=twofish-256', 'cipher-alg=serpent-128,cipher-mode=cbc,ivgen-alg=essiv']) {
  t.test(`qemu-made LUKS1 ${o}: read and write like qemu`, { skip: peers ? false : 'qemu-img missing' }, async (t) => {
    const dir = tmpdir(t);
    const img = path.join(dir, 'q.luks');
    const kf = passFile(dir);
    qemuCreate(['-f', 'luks', '--object', `secret,id=s,file=${kf}`, '-o', `key-secret=s,iter-time=10,${o}`, img, '1M']);
    const ref = Buffer.alloc(1 << 20);
    for (let i = 0; i < ref.length; i += 16) ref.writeUInt32LE((i * 2654435761) >>> 0, i);
    const src = path.join(dir, 'src.raw');
    fs.writeFileSync(src, ref);
    sh('qemu-img', ['convert', '-n', '--object', `secret,id=s,file=${kf}`, '-f', 'raw', src, '--target-image-opts', `driver=luks,key-secret=s,file.filename=${img}`]);
    const n = await openLuksImage(img, false);
    t.ok((await readAll(n)).equals(ref), 'reads what qemu wrote');
    await randomWrites(n, ref, 13, 5);
    await n.close();
    t.ok(qemuLuksRaw(dir, img).equals(ref), 'qemu reads what we wrote');
  });
}
