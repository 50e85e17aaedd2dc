// fat:rw: guest changes made with mtools on a raw copy, written back through the node's
// write() and flush(), reach the host directory (hostile states: hostile.test.ts).
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { openImage } from '../../lib/core/graph';
import { writeAt } from '../../lib/core/io';
import type { BlockNode } from '../../lib/core/node';
import { tmpdir } from '../helpers';
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


t.test('swapped names and directories moved across parents', { skip: missing }, async (t) => {
  const d = tmpdir(t);
  const host = path.join(d, 'host');
  fs.mkdirSync(path.join(host, 'p', 'q'), { recursive: true });
  fs.mkdirSync(path.join(host, 'r'));
  fs.writeFileSync(path.join(host, 'first file.txt'), 'one\n');
  fs.writeFileSync(path.join(host, 'second file.txt'), 'two\n');
  fs.writeFileSync(path.join(host, 'p', 'q', 'deep.txt'), 'deep\n');
  fs.writeFileSync(path.join(host, 'r', 'in r.txt'), 'r\n');
  const node = await openImage(`fat:rw:12:${host}`);
  t.teardown(() => node.close().catch(() => undefined));
  const raw = path.join(d, 'disk.raw');
  await dumpNode(node, raw);
  const I = img(raw);
  t.equal(m('mren', '-i', I, '::/first file.txt', '::/tmp name.txt'), '');
  t.equal(m('mren', '-i', I, '::/second file.txt', '::/first file.txt'), '');
  t.equal(m('mren', '-i', I, '::/tmp name.txt', '::/second file.txt'), '');
  t.equal(m('mmove', '-i', I, '::/p/q', '::/r/q moved'), '');
  t.equal(m('mren', '-i', I, '::/r', '::/p2 dir'), '');
  await writeAll(node, raw);
  await node.flush!();
  t.equal(fs.readFileSync(path.join(host, 'first file.txt'), 'utf8'), 'two\n');
  t.equal(fs.readFileSync(path.join(host, 'second file.txt'), 'utf8'), 'one\n');
  t.equal(fs.readFileSync(path.join(host, 'p2 dir', 'q moved', 'deep.txt'), 'utf8'), 'deep\n');
  t.equal(fs.readFileSync(path.join(host, 'p2 dir', 'in r.txt'), 'utf8'), 'r\n');
  t.same(fs.readdirSync(path.join(host, 'p')), []);
  t.same(fs.readdirSync(host).sort(), ['first file.txt', 'p', 'p2 dir', 'second file.txt']);
  // a short name without a long name stays as FAT stores it (upper case), as Linux shows it
  t.equal(m('mren', '-i', I, '::/first file.txt', '::/SHORT.TXT'), '');
  await writeAll(node, raw);
  await node.close();
  t.equal(fs.readFileSync(path.join(host, 'SHORT.TXT'), 'utf8'), 'two\n');
});

t.test('names differing only in case: one is shown, commits still work', { skip: missing }, async (t) => {
  const d = tmpdir(t);
  const host = path.join(d, 'host');
  fs.mkdirSync(host);
  fs.writeFileSync(path.join(host, 'README'), 'upper\n');
  fs.writeFileSync(path.join(host, 'Readme'), 'mixed\n');
  const node = await openImage(`fat:rw:12:${host}`);
  t.teardown(() => node.close().catch(() => undefined));
  const raw = path.join(d, 'disk.raw');
  await dumpNode(node, raw);
  const I = img(raw);
  const dir = mt('mdir', ['-b', '-i', I, '::/']);
  t.equal(dir.stdout.trim().split('\n').length, 1, dir.stdout);
  const f = path.join(d, 'n');
  fs.writeFileSync(f, 'new\n');
  t.equal(m('mcopy', '-i', I, f, '::/new file'), '');
  await writeAll(node, raw);
  await node.close();
  t.same(fs.readdirSync(host).sort(), ['README', 'Readme', 'new file']);
  t.equal(fs.readFileSync(path.join(host, 'Readme'), 'utf8'), 'mixed\n', 'the hidden one is untouched');
});
