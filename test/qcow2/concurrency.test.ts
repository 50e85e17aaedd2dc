// Many allocating writes in flight at once (the pipelined path), mixed with zeroing, discard
// and a snapshot: the result equals a model and qemu-img check stays clean.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import t from 'tap';
import { openImage } from '../../lib/core/graph';
import { discardAt, readAt, writeAt, writeZeroesAt } from '../../lib/core/io';

for (const cluster of ['4096', '65536']) {
  t.test(`concurrent allocation, cluster_size=${cluster}`, async (t) => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'qcow2-conc-'));
    t.teardown(() => fs.rmSync(d, { recursive: true, force: true }));
    const base = path.join(d, 'base.raw');
    const size = 16 << 20;
    const model = Buffer.alloc(size);
    for (let i = 0; i < size; i += 4) model.writeUInt32LE((i * 2654435761) >>> 0, i);
    fs.writeFileSync(base, model);
    const img = path.join(d, 'a.qcow2');
    spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cluster}`, '-b', 'base.raw', '-F', 'raw', img]);
    const node = await openImage(img, { format: 'qcow2' });
    // disjoint slots so the final content does not depend on ordering
    const slot = 96 * 1024;
    const slots = [...Array(Math.floor(size / slot)).keys()];
    let seed = 42;
    const rnd = (n: number): number => { seed = (seed * 1103515245 + 12345) & 0x7fffffff; return seed % n; };
    for (let i = slots.length - 1; i > 0; i--) { const j = rnd(i + 1); [slots[i], slots[j]] = [slots[j], slots[i]]; }
    const ops = slots.map((s, k) => async (): Promise<void> => {
      const off = s * slot + rnd(4096);
      const len = 1 + rnd(slot - 4096 - 1);
      if (k % 7 === 3) {
        await writeZeroesAt(node, off, len, { mayUnmap: k % 2 === 0 });
        model.fill(0, off, off + len);
      } else if (k % 11 === 5) {
        await discardAt(node, off, len); // advisory: the model does not change when nothing is freed
        const check = Buffer.alloc(len);
        await readAt(node, check, off);
        check.copy(model, off);
      } else {
        const data = Buffer.alloc(len, (k % 250) + 1);
        model.set(data, off);
        await writeAt(node, data, off);
      }
    });
    let next = 0;
    const worker = async (): Promise<void> => { while (next < ops.length) await ops[next++](); };
    const snap = (async () => { await new Promise((r) => setTimeout(r, 5)); await node.snapshotCreate!('mid'); })();
    await Promise.all([worker(), worker(), worker(), worker(), worker(), worker(), worker(), worker(), snap]);
    const got = Buffer.alloc(size);
    await readAt(node, got, 0);
    t.ok(got.equals(model), 'contents equal the model');
    await node.close();
    const c = spawnSync('qemu-img', ['check', img], { encoding: 'utf8' });
    t.equal(c.status, 0, `qemu-img check: ${c.stdout}${c.stderr}`);
    const ref = path.join(d, 'ref.raw');
    fs.writeFileSync(ref, model);
    t.equal(spawnSync('qemu-img', ['compare', '-F', 'raw', img, ref]).status, 0, 'qemu-img compare: identical');
  });
}
