// fat:rw: hostile or inconsistent guest states (traversal names, loops, cross-links, size
// mismatches, symlinked targets, a reformat) are refused whole: nothing reaches the host.
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { openImage } from '../../lib/core/graph';
import { writeAt } from '../../lib/core/io';
import type { BlockNode } from '../../lib/core/node';
import { lfnChecksum, writeLfn } from '../../lib/synth/vvfat/names';
import { run, tmpdir } from '../helpers';
import { dumpNode, failure, img, mt, peersMissing, snapshot, writeBack } from './helpers';

const missing = peersMissing();

async function writeAll(node: BlockNode, raw: string): Promise<number> {
  return writeBack(node, raw, (b, o) => writeAt(node, b, o));
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
    name: 'a directory that contains itself', why: /cross-linked|loops/, edit: (g) => {
      const e = Buffer.alloc(32);
      fs.readSync(g.fd, e, 0, 32, findEntry(g, 'SUB        '));
      const sub = e.readUInt16LE(26);
      const cl = Buffer.alloc(g.cs);
      const at = g.data + (sub - 2) * g.cs;
      fs.readSync(g.fd, cl, 0, g.cs, at);
      for (let p = 0; p < g.cs; p += 32) {
        if (cl.subarray(p, p + 11).toString('latin1') === 'INNER      ') {
          const b = Buffer.alloc(2);
          b.writeUInt16LE(sub);
          patch(g, at + p + 26, b); // sub/inner is sub itself
          return;
        }
      }
      throw new Error('no INNER entry');
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
    fs.mkdirSync(path.join(host, 'SUB', 'INNER'), { recursive: true });
    fs.writeFileSync(path.join(host, 'SUB', 'INNER', 'F.TXT'), 'f\n');
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
