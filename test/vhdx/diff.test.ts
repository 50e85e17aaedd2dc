// Differencing VHDX (parent locator, NOT_PRESENT / PARTIALLY_PRESENT blocks, sector bitmaps).
// qemu 7.2 cannot make or read these, so the child is crafted here from the specification.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { openImage } from '../../lib/core/graph';
import { writeAt } from '../../lib/core/io';
import { createImage } from '../../lib/ops/create';
import { FILE_PARAMS_GUID, guidText, HEADER1, HEADER2, MiB, PARENT_LOCATOR_GUID, parseHeader, VHDX_PARENT_LOCATOR_TYPE } from '../../lib/formats/vhdx/format';
import { errKind, firstDiff, ourView, qemuImg, qemuIo, tmpdir } from '../qcow2/helpers';

function locator(kv: Record<string, string>): Buffer {
  const entries = Object.entries(kv);
  const head = Buffer.alloc(20 + entries.length * 12);
  VHDX_PARENT_LOCATOR_TYPE.copy(head, 0);
  head.writeUInt16LE(entries.length, 18);
  const strings: Buffer[] = [];
  let off = head.length;
  entries.forEach(([k, v], i) => {
    const kb = Buffer.from(k, 'utf16le'); const vb = Buffer.from(v, 'utf16le');
    head.writeUInt32LE(off, 20 + i * 12); off += kb.length;
    head.writeUInt32LE(off, 20 + i * 12 + 4); off += vb.length;
    head.writeUInt16LE(kb.length, 20 + i * 12 + 8);
    head.writeUInt16LE(vb.length, 20 + i * 12 + 10);
    strings.push(kb, vb);
  });
  return Buffer.concat([head, ...strings]);
}

function dataWriteGuid(file: string): string {
  const b = fs.readFileSync(file);
  const a = parseHeader(b.subarray(HEADER1, HEADER1 + 4096))!;
  const c = parseHeader(b.subarray(HEADER2, HEADER2 + 4096))!;
  return `{${guidText((a.seq > c.seq ? a : c).dataWriteGuid)}}`;
}

async function makeChild(dir: string, linkage: string): Promise<{ child: string; expect: Buffer }> {
  const parent = path.join(dir, 'parent.vhdx');
  if (!fs.existsSync(parent)) {
    qemuImg('create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', parent, '8M');
    qemuIo(parent, ['write -P 0x50 0 8M'], ['-f', 'vhdx']);
  }
  const child = path.join(dir, 'child.vhdx');
  await createImage({ format: 'vhdx', filename: child, size: 8 * MiB, options: { block_size: '1M' } });
  let b = fs.readFileSync(child);
  const rt = 192 * 1024;
  const batOff = Number(b.readBigUInt64LE(rt + 16 + 16));
  const metaOff = Number(b.readBigUInt64LE(rt + 48 + 16));
  // file parameters: has_parent; one more metadata entry: the parent locator
  const count = b.readUInt16LE(metaOff + 10);
  for (let i = 0; i < count; i++) {
    const e = metaOff + 32 + 32 * i;
    if (b.subarray(e, e + 16).equals(FILE_PARAMS_GUID)) {
      const item = metaOff + b.readUInt32LE(e + 16);
      b.writeUInt32LE(b.readUInt32LE(item + 4) | 2, item + 4);
    }
  }
  const loc = locator({ parent_linkage: linkage, relative_path: '.\\parent.vhdx', absolute_win32_path: 'C:\\nowhere\\parent.vhdx' });
  const e = metaOff + 32 + 32 * count;
  PARENT_LOCATOR_GUID.copy(b, e);
  b.writeUInt32LE(65536 + 4096, e + 16);
  b.writeUInt32LE(loc.length, e + 20);
  b.writeUInt32LE(4, e + 24);
  loc.copy(b, metaOff + 65536 + 4096);
  b.writeUInt16LE(count + 1, metaOff + 10);
  // payload: block 0 full (0xa1), block 2 partial (0xb2 where the bitmap says so), sector bitmap
  const end = Math.ceil(b.length / MiB) * MiB;
  const a = Buffer.alloc(MiB, 0xa1); const p = Buffer.alloc(MiB, 0xb2); const sb = Buffer.alloc(MiB);
  const present = [...Array(10).keys(), 100, ...Array.from({ length: 48 }, (_, i) => 2000 + i)];
  for (const s of present) sb[(2 * 2048 + s) >> 3] |= 1 << ((2 * 2048 + s) & 7);
  b = Buffer.concat([b, Buffer.alloc(end - b.length), a, p, sb]);
  const mb = end / MiB;
  const set = (i: number, state: number, offMb: number) => { b.writeUInt32LE(((offMb << 20) | state) >>> 0, batOff + i * 8); b.writeUInt32LE(0, batOff + i * 8 + 4); };
  for (let i = 0; i < 8; i++) set(i, 0, 0);
  set(0, 6, mb);
  set(2, 7, mb + 1);
  set(3, 2, 0);
  set(4096, 6, mb + 2);
  fs.writeFileSync(child, b);
  const expect = Buffer.alloc(8 * MiB, 0x50);
  a.copy(expect, 0);
  for (const s of present) expect.fill(0xb2, 2 * MiB + s * 512, 2 * MiB + (s + 1) * 512);
  expect.fill(0, 3 * MiB, 4 * MiB);
  return { child, expect };
}

t.test('differencing image reads through its parent', async (t) => {
  const dir = tmpdir(t);
  await makeChild(dir, '{00000000-0000-0000-0000-000000000000}');
  const { child, expect } = await makeChild(dir, dataWriteGuid(path.join(dir, 'parent.vhdx')));
  const n = await openImage(child, { readOnly: true });
  t.equal(n.backing?.driver, 'vhdx', 'parent opened');
  await n.close();
  t.equal(firstDiff(await ourView(child), expect), -1, 'guest view');
  const rw = await openImage(child, {});
  t.equal(await errKind(writeAt(rw, Buffer.alloc(10), 0)), 'unsupported', 'writes refused');
  await rw.close();
});

t.test('parent linkage mismatch is an image error', async (t) => {
  const dir = tmpdir(t);
  const { child } = await makeChild(dir, '{12345678-0000-0000-0000-000000000000}');
  t.equal(await errKind(openImage(child, { readOnly: true })), 'image');
  fs.unlinkSync(path.join(dir, 'parent.vhdx'));
  const { child: c2 } = await makeChild(dir, 'x');
  fs.unlinkSync(path.join(dir, 'parent.vhdx'));
  t.not(await errKind(openImage(c2, { readOnly: true })), 'none', 'missing parent fails');
});
