// fat:rw: guest changes made with mtools on a raw copy, written back through the node's
// write() and flush(), reach the host directory; inconsistent or hostile states change nothing.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { openImage } from '../../lib/core/graph';
import { writeAt } from '../../lib/core/io';
import type { BlockNode } from '../../lib/core/node';
import { lfnChecksum, writeLfn } from '../../lib/synth/vvfat/names';
import { run, tmpdir } from '../helpers';
import { diffTrees, dumpNode, failure, fsck, img, mt, peersMissing, writeBack } from './helpers';

const missing = peersMissing();

function smallTree(dir: string): void {
  fs.mkdirSync(path.join(dir, 'docs', 'old'), { recursive: true });
  fs.mkdirSync(path.join(dir, 'keep'));
  fs.writeFileSync(path.join(dir, 'a.txt'), 'alpha\n');
  fs.writeFileSync(path.join(dir, 'modify me.txt'), 'before\n');
  fs.writeFileSync(path.join(dir, 'delete me.bin'), Buffer.alloc(40000, 3));
  fs.writeFileSync(path.join(dir, 'rename me.txt'), 'renamed content\n');
  fs.writeFileSync(path.join(dir, 'docs', 'inner.txt'), 'inner\n');
  fs.writeFileSync(path.join(dir, 'docs', 'old', 'ancient.txt'), 'ancient\n');
  fs.writeFileSync(path.join(dir, 'keep', 'same.bin'), crypto.randomBytes(70000));
  fs.writeFileSync(path.join(dir, 'empty'), '');
}

/** every path below dir with its type, mode and content hash */
function snapshot(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string, rel: string): void => {
    for (const n of fs.readdirSync(d).sort()) {
      const p = path.join(d, n);
      const st = fs.lstatSync(p);
      const r = rel ? `${rel}/${n}` : n;
      if (st.isDirectory()) { out.push(`${r}/ ${st.mode.toString(8)}`); walk(p, r); }
      else out.push(`${r} ${st.mode.toString(8)} ${crypto.createHash('sha256').update(fs.readFileSync(p)).digest('hex')}`);
    }
  };
  walk(dir, '');
  return out;
}

async function writeAll(node: BlockNode, raw: string): Promise<number> {
  return writeBack(node, raw, (b, o) => writeAt(node, b, o));
}

/** runs an mtools command; returns '' or the failure */
function m(cmd: string, ...args: string[]): string {
  const r = mt(cmd, args);
  return r.code === 0 ? '' : `${cmd} ${args.join(' ')}: ${r.stderr}`;
}

for (const spec of ['rw:', 'rw:32:', 'floppy:rw:12:']) {
  t.test(`fat:${spec} mtools changes reach the host`, { skip: missing }, async (t) => {
    const d = tmpdir(t);
    const host = path.join(d, 'host');
    const ref = path.join(d, 'ref');
    fs.mkdirSync(host);
    smallTree(host);
    fs.cpSync(host, ref, { recursive: true });
    const keptIno = fs.statSync(path.join(host, 'keep', 'same.bin')).ino;
    const renamedIno = fs.statSync(path.join(host, 'rename me.txt')).ino;
    const node = await openImage(`fat:${spec}${host}`);
    t.teardown(() => node.close().catch(() => undefined));
    t.equal(node.readOnly, false);
    const raw = path.join(d, 'disk.raw');
    await dumpNode(node, raw);
    const I = img(raw);
    const src = path.join(d, 'src');
    fs.mkdirSync(src);
    fs.writeFileSync(path.join(src, 'new file ✓ ünï.txt'), 'brand new\n');
    fs.writeFileSync(path.join(src, 'modified'), 'after the change, longer than before\n'.repeat(300));
    fs.writeFileSync(path.join(src, 'nested.dat'), crypto.randomBytes(30000));
    // round 1: create, modify, delete, mkdir, rename file and directory
    t.equal(m('mcopy', '-i', I, path.join(src, 'new file ✓ ünï.txt'), '::/new file ✓ ünï.txt'), '');
    fs.copyFileSync(path.join(src, 'new file ✓ ünï.txt'), path.join(ref, 'new file ✓ ünï.txt'));
    t.equal(m('mcopy', '-o', '-i', I, path.join(src, 'modified'), '::/modify me.txt'), '');
    fs.copyFileSync(path.join(src, 'modified'), path.join(ref, 'modify me.txt'));
    t.equal(m('mdel', '-i', I, '::/delete me.bin'), '');
    fs.rmSync(path.join(ref, 'delete me.bin'));
    t.equal(m('mmd', '-i', I, '::/brand new dir'), '');
    t.equal(m('mcopy', '-i', I, path.join(src, 'nested.dat'), '::/brand new dir/nested.dat'), '');
    fs.mkdirSync(path.join(ref, 'brand new dir'));
    fs.copyFileSync(path.join(src, 'nested.dat'), path.join(ref, 'brand new dir', 'nested.dat'));
    t.equal(m('mren', '-i', I, '::/rename me.txt', '::/renamed with a long name.txt'), '');
    fs.renameSync(path.join(ref, 'rename me.txt'), path.join(ref, 'renamed with a long name.txt'));
    t.equal(m('mren', '-i', I, '::/docs', '::/documents moved'), '');
    fs.renameSync(path.join(ref, 'docs'), path.join(ref, 'documents moved'));
    t.equal(fsck(raw, d).code, 0, 'the guest image is clean');
    const n = await writeAll(node, raw);
    t.ok(n > 0, `${n} chunks written`);
    await node.flush!();
    const diff = diffTrees(ref, host);
    t.equal(diff.code, 0, `host after round 1: ${diff.stdout}`);
    t.same(fs.readdirSync(host).filter((x) => x.startsWith('.vvfat')), [], 'no temp files left');
    // the guest's file system reads the same after the commit (free clusters may read zeros)
    const view = path.join(d, 'view.raw');
    await dumpNode(node, view);
    t.equal(fsck(view, d).code, 0, 'the committed view passes fsck.fat');
    const vout = path.join(d, 'view-out');
    fs.mkdirSync(vout);
    t.equal(mt('mcopy', ['-s', '-n', '-i', img(view), '::/', vout + '/']).code, 0);
    t.equal(diffTrees(ref, vout).code, 0, 'the committed view holds the same tree');
    fs.rmSync(view);
    t.equal(fs.statSync(path.join(host, 'keep', 'same.bin')).ino, keptIno, 'an unchanged file is not rewritten');
    t.equal(fs.statSync(path.join(host, 'renamed with a long name.txt')).ino, renamedIno, 'a renamed file is renamed, not copied');
    // round 2 on the committed state: modify a moved file, delete a directory tree, rename back
    fs.writeFileSync(path.join(src, 'inner2'), 'inner v2\n');
    t.equal(m('mcopy', '-o', '-i', I, path.join(src, 'inner2'), '::/documents moved/inner.txt'), '');
    fs.copyFileSync(path.join(src, 'inner2'), path.join(ref, 'documents moved', 'inner.txt'));
    t.equal(m('mdeltree', '-i', I, '::/documents moved/old'), '');
    fs.rmSync(path.join(ref, 'documents moved', 'old'), { recursive: true });
    t.equal(m('mren', '-i', I, '::/renamed with a long name.txt', '::/rename me.txt'), '');
    fs.renameSync(path.join(ref, 'renamed with a long name.txt'), path.join(ref, 'rename me.txt'));
    t.equal(m('mdel', '-i', I, '::/brand new dir/nested.dat'), '');
    fs.rmSync(path.join(ref, 'brand new dir', 'nested.dat'));
    t.equal(m('mattrib', '-i', I, '+r', '::/a.txt'), '');
    await writeAll(node, raw);
    await node.close(); // commits too
    t.equal(fs.statSync(path.join(host, 'a.txt')).mode & 0o222, 0, 'the read-only attribute reaches the host');
    fs.chmodSync(path.join(host, 'a.txt'), 0o644);
    const diff2 = diffTrees(ref, host);
    t.equal(diff2.code, 0, `host after round 2: ${diff2.stdout}`);
    // a fresh read-only disk of the host shows the same tree
    const again = await openImage(`fat:${spec.replace('rw:', '')}${host}`);
    const raw2 = path.join(d, 'again.raw');
    await dumpNode(again, raw2);
    await again.close();
    const out = path.join(d, 'out');
    fs.mkdirSync(out);
    const x = mt('mcopy', ['-s', '-n', '-i', img(raw2), '::/', out + '/']);
    t.equal(x.code, 0, x.stderr);
    t.equal(diffTrees(ref, out).code, 0, 'reopened disk matches');
  });
}

/** FAT16 hard disk geometry of a dumped image: offsets of FAT, root directory and data */
function fat16(raw: string): { fd: number; fat: number; root: number; data: number; cs: number } {
  const fd = fs.openSync(raw, 'r+');
  const bs = Buffer.alloc(512);
  fs.readSync(fd, bs, 0, 512, 63 * 512);
  const part = 63 * 512;
  const reserved = bs.readUInt16LE(14);
  const spf = bs.readUInt16LE(22);
  const fat = part + reserved * 512;
  const root = fat + 2 * spf * 512;
  return { fd, fat, root, data: root + 32 * 512, cs: bs[13] * 512 };
}

/** offset of the short entry with this 11-byte name in the root directory */
function findEntry(g: ReturnType<typeof fat16>, short: string): number {
  const buf = Buffer.alloc(512 * 32);
  fs.readSync(g.fd, buf, 0, buf.length, g.root);
  for (let p = 0; p < buf.length; p += 32) if (buf.subarray(p, p + 11).toString('latin1') === short) return g.root + p;
  throw new Error(`no entry ${short}`);
}

function setFat(g: ReturnType<typeof fat16>, c: number, v: number): void {
  const b = Buffer.alloc(2);
  b.writeUInt16LE(v);
  fs.writeSync(g.fd, b, 0, 2, g.fat + c * 2);
}

function patch(g: ReturnType<typeof fat16>, off: number, bytes: Buffer): void {
  fs.writeSync(g.fd, bytes, 0, bytes.length, off);
}

const hostile: Array<{ name: string; why: RegExp; edit: (g: ReturnType<typeof fat16>) => void }> = [
  {
    name: "a long name '..'", why: /invalid file name/, edit: (g) => {
      const p = findEntry(g, 'VICTIM  TXT');
      const slot = Buffer.alloc(32);
      writeLfn(slot, 0, '..', lfnChecksum('VICTIM  TXT'));
      patch(g, p - 32, slot); // overwrite the entry before it (the long name of 'a.txt')
    },
  },
  {
    name: "a long name with '/'", why: /path separator/, edit: (g) => {
      const p = findEntry(g, 'VICTIM  TXT');
      const slot = Buffer.alloc(32);
      writeLfn(slot, 0, '../../x', lfnChecksum('VICTIM  TXT'));
      patch(g, p - 32, slot);
    },
  },
  {
    name: 'a control character', why: /control character/, edit: (g) => {
      const p = findEntry(g, 'VICTIM  TXT');
      patch(g, p + 1, Buffer.from([0x01]));
    },
  },
  {
    name: 'a cluster chain loop', why: /loops/, edit: (g) => {
      const p = findEntry(g, 'BIG     BIN');
      const b = Buffer.alloc(32);
      fs.readSync(g.fd, b, 0, 32, p);
      const c = b.readUInt16LE(26);
      setFat(g, c + 2, c); // third cluster points back to the first
    },
  },
  {
    name: 'cross-linked files', why: /cross-linked/, edit: (g) => {
      const a = Buffer.alloc(32);
      fs.readSync(g.fd, a, 0, 32, findEntry(g, 'BIG     BIN'));
      const p = findEntry(g, 'VICTIM  TXT');
      const b = Buffer.alloc(2);
      b.writeUInt16LE(a.readUInt16LE(26) + Math.ceil(100000 / g.cs) - 1); // victim is big.bin's last cluster
      patch(g, p + 26, b);
    },
  },
  {
    name: 'a size that does not match the chain', why: /does not match/, edit: (g) => {
      const p = findEntry(g, 'BIG     BIN');
      const b = Buffer.alloc(4);
      b.writeUInt32LE(200000);
      patch(g, p + 28, b);
    },
  },
  {
    name: 'a chain running into a free cluster', why: /free cluster/, edit: (g) => {
      const b = Buffer.alloc(32);
      fs.readSync(g.fd, b, 0, 32, findEntry(g, 'BIG     BIN'));
      setFat(g, b.readUInt16LE(26) + 1, 0);
    },
  },
  {
    name: 'a cluster out of range', why: /out of range/, edit: (g) => {
      const p = findEntry(g, 'VICTIM  TXT');
      const b = Buffer.alloc(2);
      b.writeUInt16LE(0xfff0);
      patch(g, p + 26, b);
    },
  },
];

for (const h of hostile) {
  t.test(`${h.name} changes nothing on the host`, { skip: missing }, async (t) => {
    const d = tmpdir(t);
    const host = path.join(d, 'host');
    fs.mkdirSync(host);
    fs.writeFileSync(path.join(host, 'a.txt'), 'a\n');
    fs.writeFileSync(path.join(host, 'VICTIM.TXT'), 'victim\n');
    fs.writeFileSync(path.join(host, 'big.bin'), crypto.randomBytes(100000));
    fs.writeFileSync(path.join(path.dirname(host), 'x'), 'outside\n');
    const before = snapshot(d);
    const node = await openImage(`fat:rw:${host}`);
    const raw = path.join(d, 'disk.raw');
    await dumpNode(node, raw);
    // a legitimate change in the same batch must not be applied either
    const newf = path.join(d, 'new.txt');
    fs.writeFileSync(newf, 'new\n');
    const r = mt('mcopy', ['-i', img(raw), newf, '::/NEW.TXT']);
    t.equal(r.code, 0, r.stderr);
    fs.rmSync(newf);
    const g = fat16(raw);
    h.edit(g);
    fs.closeSync(g.fd);
    await writeAll(node, raw);
    const e = await failure(node.flush!());
    t.equal(e.kind, 'image', e.message);
    t.match(e.message, h.why);
    t.notOk(e.message.includes('\n'), 'one line');
    const e2 = await failure(node.close());
    t.equal(e2.kind, 'image', 'close refuses too');
    fs.rmSync(raw);
    t.same(snapshot(d), before, 'host unchanged');
  });
}

t.test('a new file where the host has a hidden symlink is refused', { skip: missing }, async (t) => {
  const d = tmpdir(t);
  const host = path.join(d, 'host');
  fs.mkdirSync(host);
  fs.mkdirSync(path.join(d, 'outside'));
  fs.symlinkSync(path.join(d, 'outside'), path.join(host, 'link'));
  const node = await openImage(`fat:rw:${host}`);
  const raw = path.join(d, 'disk.raw');
  await dumpNode(node, raw);
  t.equal(mt('mmd', ['-i', img(raw), '::/link']).code, 0);
  const f = path.join(d, 'f');
  fs.writeFileSync(f, 'payload');
  t.equal(mt('mcopy', ['-i', img(raw), f, '::/link/f']).code, 0);
  await writeAll(node, raw);
  const e = await failure(node.close());
  t.equal(e.kind, 'image');
  t.match(e.message, /exists on the host/);
  t.same(fs.readdirSync(path.join(d, 'outside')), [], 'nothing written through the symlink');
  t.ok(fs.lstatSync(path.join(host, 'link')).isSymbolicLink());
});

t.test('a reformatted partition is refused', { skip: missing }, async (t) => {
  const d = tmpdir(t);
  const host = path.join(d, 'host');
  fs.mkdirSync(host);
  fs.writeFileSync(path.join(host, 'keep.txt'), 'keep\n');
  const node = await openImage(`fat:rw:12:${host}`);
  const raw = path.join(d, 'disk.raw');
  await dumpNode(node, raw);
  const part = path.join(d, 'part.raw');
  fs.writeFileSync(part, fs.readFileSync(raw).subarray(63 * 512));
  const r = run('mkfs.fat', ['-F', '16', part]);
  t.equal(r.code, 0, r.stderr);
  const whole = fs.readFileSync(raw);
  fs.readFileSync(part).copy(whole, 63 * 512);
  fs.writeFileSync(raw, whole);
  await writeAll(node, raw);
  const e = await failure(node.close());
  t.equal(e.kind, 'image');
  t.match(e.message, /boot sector/);
  t.equal(fs.readFileSync(path.join(host, 'keep.txt'), 'utf8'), 'keep\n');
});
