import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { childSha256, imgmount, isMounted, mount, py, run, tmpdir, mirrorWrites } from '../helpers';
import { errOf, have, openLuksImage, PASS, passFile, qemuCreate } from './helpers';

const fuse = fs.existsSync('/dev/fuse');
const peers = have('qemu-img');


for (const fmt of ['luks', 'qcow2'] as const) {
  // qcow2+LUKS: allocated clusters are decrypted natively, new ones are allocated by
  // TypeScript; a stale map entry (the rest of a newly allocated cluster) would show here
  t.test(`${fmt}: mount with a secret, random I/O, unmount, qemu-img compare`, { skip: !fuse ? 'no /dev/fuse' : !peers ? 'qemu-img missing' : false }, async (t) => {
    const d = tmpdir(t);
    const img = path.join(d, `disk.${fmt}`);
    // a passphrase of this test alone: other test files running at the same time may show
    // the shared test passphrase in their own qemu-img argv
    const mine = `mount-${process.pid}-${Date.now()}-${fmt}`;
    const kf = passFile(d, mine);
    const o = fmt === 'luks' ? 'key-secret' : 'encrypt.key-secret';
    qemuCreate(['-q', '-f', fmt, '--object', `secret,id=s,file=${kf}`, '-o', `${fmt === 'qcow2' ? 'encrypt.format=luks,' : ''}${o}=s,${fmt === 'qcow2' ? 'encrypt.' : ''}iter-time=10`, img, '4M']);
    // the reference starts as qemu's view (a fresh LUKS payload is not zeros)
    const ref = path.join(d, 'ref.raw');
    const spec = `driver=${fmt},${o}=s,file.filename=${img}`;
    t.equal(run('qemu-img', ['convert', '--object', `secret,id=s,file=${kf}`, '--image-opts', spec, '-O', 'raw', ref]).code, 0);
    const mnt = path.join(d, 'm');
    const bad = imgmount(['mount', '--object', 'secret,id=s,data=wrong', '-o', `${o}=s`, img, mnt]);
    t.equal(bad.code, 4, 'wrong secret: exit 4');
    t.equal(bad.stderr.trim(), 'imgmount: Invalid password, cannot unlock any keyslot');
    t.notOk(isMounted(mnt), 'nothing mounted');
    const m = mount(t, img, mnt, ['--object', `secret,id=s,file=${kf}`, '-o', `${o}=s`]);
    t.equal(m.code, 0, `mount: ${m.stderr}`);
    if (m.code !== 0) return;
    const ps = run('ps', ['-eo', 'args']).stdout;
    t.notOk(ps.includes(mine), 'the passphrase is in no process argv');
    const w = mirrorWrites(3, 40, [path.join(mnt, 'disk.raw'), ref], 100000);
    t.equal(w.stdout.trim(), 'ok', `client: ${w.stderr}`);
    t.equal(childSha256(path.join(mnt, 'disk.raw')), childSha256(ref), 'mount equals the reference');
    t.equal(imgmount(['unmount', mnt]).code, 0, 'unmount');
    const cmp = run('qemu-img', ['compare', '--object', `secret,id=s,file=${kf}`, '--image-opts', spec, `driver=raw,file.filename=${ref}`]);
    t.equal(cmp.code, 0, `qemu-img compare: ${cmp.stdout}${cmp.stderr}`);
    if (fmt === 'qcow2') {
      const chk = run('qemu-img', ['check', '--object', `secret,id=s,file=${kf}`, '--image-opts', spec]);
      t.equal(chk.code, 0, `qemu-img check: ${chk.stdout}`);
    }
  });
}

t.test('hostile LUKS1 headers are image errors, never hangs or crashes', { skip: peers ? false : 'qemu-img missing' }, async (t) => {
  const d = tmpdir(t);
  const good = path.join(d, 'good.luks');
  qemuCreate(['-q', '-f', 'luks', '--object', `secret,id=s,data=${PASS}`, '-o', 'key-secret=s,iter-time=10', good, '1M']);
  const base = fs.readFileSync(good);
  const payload = base.readUInt32BE(104) * 512;
  const cases: [string, (b: Buffer) => Buffer, string][] = [
    ['truncated header', (b) => b.subarray(0, 300), 'image'],
    ['truncated key material', (b) => b.subarray(0, 8 * 512 + 1000), 'image'],
    ['payload offset past the end', (b) => { b.writeUInt32BE(0x7fffffff, 104); return b; }, 'image'],
    ['key slot offset past the payload', (b) => { b.writeUInt32BE(payload / 512, 208 + 40); return b; }, 'image'],
    ['key slot in the header', (b) => { b.writeUInt32BE(0, 208 + 40); return b; }, 'image'],
    ['stripes not 4000', (b) => { b.writeUInt32BE(4001, 208 + 44); return b; }, 'image'],
    ['huge iteration count', (b) => { b.writeUInt32BE(0xffffffff, 208 + 4); return b; }, 'image'],
    ['zero master key iterations', (b) => { b.writeUInt32BE(0, 164); return b; }, 'image'],
    ['bad slot state', (b) => { b.writeUInt32BE(0x12345678, 208 + 48); return b; }, 'image'],
    ['key size 0', (b) => { b.writeUInt32BE(0, 108); return b; }, 'image'],
    ['cipher name unterminated', (b) => { b.fill(0x41, 8, 40); return b; }, 'image'],
    ['unknown cipher', (b) => { b.fill(0, 8, 40); b.write('blowfish', 8); return b; }, 'unsupported'],
    ['unknown hash', (b) => { b.fill(0, 72, 104); b.write('md4', 72); return b; }, 'image'],
    ['version 3', (b) => { b.writeUInt16BE(3, 6); return b; }, 'image'],
  ];
  for (const [name, mutate, kind] of cases) {
    const f = path.join(d, `h-${name.replace(/\W+/g, '_')}.luks`);
    fs.writeFileSync(f, mutate(Buffer.from(base)));
    const e = await errOf(openLuksImage(f));
    t.equal(e.kind, kind, `${name}: ${e.message}`);
    t.notMatch(e.message, /\n/, `${name}: one line`);
  }
  const e = await errOf(openLuksImage(good));
  t.equal(e.kind, 'none', 'the unmodified image opens');
});
