import t from 'tap';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { tmpdir } from '../helpers';
import { cryptsetupFormat, errOf, have, openLuksImage, passFile, randomWrites, readAll, sh } from './helpers';

const peers = have('cryptsetup');
const FILE = 20 << 20;
const DATA_OFF = 16 << 20;

/** the volume key, as cryptsetup dumps it */
function volumeKey(dir: string, img: string): Buffer {
  const out = sh('cryptsetup', ['luksDump', '--dump-volume-key', '--batch-mode', '--key-file', passFile(dir), img]);
  const m = /MK dump:\s*([\s0-9a-f]+)/.exec(out);
  if (!m) throw new Error('no volume key in luksDump output');
  return Buffer.from(m[1].replace(/\s+/g, ''), 'hex');
}

/** independent reference: OpenSSL's own aes-xts, one call per sector, IV = sector number */
function xtsPayload(img: string, key: Buffer, sectorSize: number, decrypt: boolean): Buffer {
  const f = fs.readFileSync(img).subarray(DATA_OFF);
  const out = Buffer.alloc(f.length);
  const iv = Buffer.alloc(16);
  for (let s = 0; s * sectorSize < f.length; s++) {
    iv.writeBigUInt64LE(BigInt(s), 0);
    const c = decrypt ? crypto.createDecipheriv(`aes-${key.length * 4}-xts`, key, iv) : crypto.createCipheriv(`aes-${key.length * 4}-xts`, key, iv);
    c.update(f.subarray(s * sectorSize, (s + 1) * sectorSize)).copy(out, s * sectorSize);
  }
  return out;
}

const cases = [
  { name: 'pbkdf2, 512-byte sectors', args: ['--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000', '--sector-size', '512'], ss: 512 },
  { name: 'pbkdf2, 4096-byte sectors, aes-128', args: ['--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000', '--sector-size', '4096', '--key-size', '256'], ss: 4096 },
  { name: 'argon2id', args: ['--pbkdf', 'argon2id', '--pbkdf-force-iterations', '4', '--pbkdf-memory', '1024', '--pbkdf-parallel', '1', '--sector-size', '4096'], ss: 4096 },
  { name: 'argon2i, 2 threads', args: ['--pbkdf', 'argon2i', '--pbkdf-force-iterations', '4', '--pbkdf-memory', '2048', '--pbkdf-parallel', '2', '--sector-size', '512'], ss: 512 },
];

for (const c of cases) {
  t.test(`cryptsetup LUKS2 ${c.name}: read and write`, { skip: peers ? false : 'cryptsetup missing' }, async (t) => {
    const dir = tmpdir(t);
    const img = path.join(dir, 'l2.img');
    cryptsetupFormat(dir, img, FILE, ['--type', 'luks2', ...c.args]);
    // random ciphertext so that the plaintext is not trivially derived
    const fd = fs.openSync(img, 'r+');
    fs.writeSync(fd, crypto.randomBytes(FILE - DATA_OFF), 0, FILE - DATA_OFF, DATA_OFF);
    fs.closeSync(fd);
    const key = volumeKey(dir, img);
    const ref = xtsPayload(img, key, c.ss, true);
    const n = await openLuksImage(img, false);
    t.equal(n.size, FILE - DATA_OFF);
    t.equal(n.align, c.ss, 'request alignment is the sector size');
    t.ok((await readAll(n)).equals(ref), 'decrypts like OpenSSL per-sector aes-xts');
    await randomWrites(n, ref, 9);
    await n.close();
    t.ok(xtsPayload(img, key, c.ss, true).equals(ref), 'what we wrote decrypts with the volume key');
    sh('cryptsetup', ['open', '--test-passphrase', '--key-file', passFile(dir), img]);
    const wrong = await errOf(openLuksImage(img, true, 'wrong'));
    t.same(wrong, { kind: 'crypto', message: 'Invalid password, cannot unlock any keyslot' });
  });
}

t.test('LUKS2 header copies: a damaged primary falls back to the secondary; both damaged is an image error', { skip: peers ? false : 'cryptsetup missing' }, async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'l2.img');
  cryptsetupFormat(dir, img, FILE, ['--type', 'luks2', '--pbkdf', 'pbkdf2', '--pbkdf-force-iterations', '1000']);
  const hdrSize = Number(fs.readFileSync(img).readBigUInt64BE(8));
  const n0 = await openLuksImage(img);
  const want = await readAll(n0);
  await n0.close();
  const fd = fs.openSync(img, 'r+');
  fs.writeSync(fd, Buffer.from('X'), 0, 1, 4096 + 2); // primary JSON: checksum now wrong
  fs.closeSync(fd);
  const n1 = await openLuksImage(img);
  t.ok((await readAll(n1)).equals(want), 'opens through the secondary header');
  await n1.close();
  const fd2 = fs.openSync(img, 'r+');
  fs.writeSync(fd2, Buffer.from('X'), 0, 1, hdrSize + 4096 + 2);
  fs.closeSync(fd2);
  const e = await errOf(openLuksImage(img));
  t.equal(e.kind, 'image', e.message);
});

t.test('LUKS2 hostile metadata: huge argon2 memory is refused before hashing', { skip: peers ? false : 'cryptsetup missing' }, async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'l2.img');
  cryptsetupFormat(dir, img, FILE, ['--type', 'luks2', '--pbkdf', 'argon2id', '--pbkdf-force-iterations', '4', '--pbkdf-memory', '1024', '--pbkdf-parallel', '1']);
  const b = fs.readFileSync(img);
  const hdrSize = Number(b.readBigUInt64BE(8));
  for (const base of [0, hdrSize]) {
    const area = b.subarray(base, base + hdrSize);
    const jsonEnd = area.indexOf(0, 4096);
    const json = JSON.parse(area.subarray(4096, jsonEnd).toString());
    json.keyslots['0'].kdf.memory = 4194304;
    const text = Buffer.from(JSON.stringify(json));
    area.fill(0, 4096);
    text.copy(area, 4096);
    area.fill(0, 448, 512);
    crypto.createHash('sha256').update(area).digest().copy(area, 448);
  }
  fs.writeFileSync(img, b);
  const e = await errOf(openLuksImage(img));
  t.equal(e.kind, 'image', e.message);
  t.match(e.message, /keyslot 0\.kdf\.memory/);
});
