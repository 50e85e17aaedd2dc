// A data cluster pointing at metadata: the write fails, the corrupt bit is set, reads go on,
// and a later read-write open is refused (qemu's overlap check).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import t from 'tap';
import { spawnSync } from 'node:child_process';
import { openImage } from '../../lib/core/graph';
import { readAt, writeAt } from '../../lib/core/io';

t.test('write to a cluster that overlaps the refcount table marks the image corrupt', async (t) => {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2-overlap-'));
  t.teardown(() => fs.rmSync(d, { recursive: true, force: true }));
  const img = path.join(d, 'a.qcow2');
  spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1M']);
  spawnSync('qemu-io', ['-c', 'write -P 0x77 0 64k', img]);
  const buf = fs.readFileSync(img);
  const l1 = Number(buf.readBigUInt64BE(40));
  const refTable = Number(buf.readBigUInt64BE(48));
  const l2 = Number(buf.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
  // guest cluster 0 now claims to live where the refcount table is (COPIED set)
  buf.writeBigUInt64BE(BigInt(refTable) | (1n << 63n), l2);
  fs.writeFileSync(img, buf);
  const node = await openImage(img, { format: 'qcow2' });
  const st = await node.blockStatus(0, 65536);
  t.notOk(st.host?.writable, 'the fast path is never offered a metadata cluster');
  await t.rejects(writeAt(node, Buffer.alloc(4096, 1), 0), /overwrite metadata/, 'the write fails');
  const r = Buffer.alloc(512);
  await readAt(node, r, 128 * 1024);
  t.ok(r.every((b) => b === 0), 'reads go on');
  await node.close();
  t.ok((fs.readFileSync(img).readBigUInt64BE(72) & 2n) !== 0n, 'corrupt bit set on disk');
  await t.rejects(openImage(img, { format: 'qcow2' }), /corrupt/, 'read-write open refused');
  const ro = await openImage(img, { format: 'qcow2', readOnly: true });
  t.equal(ro.size, 1 << 20, 'read-only open works');
  await ro.close();
  t.equal(fs.readFileSync(img).readBigUInt64BE(refTable) !== 0n, true, 'refcount table untouched');
});
