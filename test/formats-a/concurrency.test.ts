// Concurrent writes (as FUSE issues them): many requests in flight on unallocated and
// allocated clusters at once; the image must stay consistent and hold every byte.
import t from 'tap';
import path from 'node:path';
import { openImage } from '../../lib/core/graph';
import { readAt, writeAt } from '../../lib/core/io';
import { assertContents, qemuCheck, qemuImg, qemuWrite, rng, tmpdir } from './helpers';

const formats: Array<[string, string[]]> = [
  ['qed', ['-o', 'cluster_size=4k']], ['vdi', []], ['qcow', []], ['parallels', ['-o', 'cluster_size=16k']],
];

for (const [fmt, opts] of formats) {
  t.test(`${fmt}: concurrent writes and reads`, async (t) => {
    const dir = tmpdir(t);
    const size = 4 << 20;
    const img = path.join(dir, `c.${fmt}`);
    qemuImg('create', '-q', '-f', fmt, ...opts, img, String(size));
    const ref = Buffer.alloc(size);
    qemuWrite(img, fmt, ['write -P 0x5a 0 65536'], ref);
    const node = await openImage(img, { format: fmt });
    const r = rng(99);
    const slot = 7000;
    const slots = [...Array(Math.floor(size / slot)).keys()].sort(() => r() - 0.5).slice(0, 300);
    await Promise.all(slots.map(async (s, i) => {
      const off = s * slot + Math.floor(r() * 100);
      const len = 1 + Math.floor(r() * (slot - 200));
      const b = Buffer.alloc(len, (i % 250) + 1);
      b.copy(ref, off);
      await writeAt(node, b, off);
      const back = Buffer.alloc(len);
      await readAt(node, back, off);
      if (!back.equals(b)) throw new Error(`read back mismatch at ${off}`);
    }));
    await node.close();
    if (fmt !== 'qcow') t.equal(qemuCheck(img).code, 0, 'qemu-img check clean');
    await assertContents(t, dir, img, fmt, ref, 'after concurrent writes');
  });
}
