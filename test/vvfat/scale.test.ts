// Opening a tree of 100k files builds only metadata: seconds, not minutes.
import fs from 'node:fs';
import path from 'node:path';
import t from 'tap';
import { openImage } from '../../lib/core/graph';
import { readAt } from '../../lib/core/io';
import { py, tmpdir } from '../helpers';

t.test('100k files open in well under 20 s', async (t) => {
  const d = tmpdir(t);
  const src = path.join(d, 'src');
  const r = py(`
import os, sys
root = sys.argv[1]
for i in range(100):
    dd = os.path.join(root, 'dir %03d' % i)
    os.makedirs(dd)
    for j in range(1000):
        with open(os.path.join(dd, 'file number %05d.txt' % j), 'wb') as f:
            if j % 10 == 0: f.write(b'x' * (j + 1))
`, [src]);
  t.equal(r.code, 0, r.stderr);
  const heap0 = process.memoryUsage().heapUsed;
  const t0 = Date.now();
  const node = await openImage(`fat:32:${src}`);
  const ms = Date.now() - t0;
  t.teardown(() => node.close());
  const heap = (process.memoryUsage().heapUsed - heap0) / 1048576;
  t.comment(`opened 100000 files in ${ms} ms, heap +${heap.toFixed(0)} MiB`);
  t.ok(ms < 20000, `open took ${ms} ms`);
  t.ok(heap < 400, `metadata heap ${heap.toFixed(0)} MiB`);
  // a file's contents come from the host on demand
  const layout = (node as unknown as { layout: { root: { dirs: Array<{ files: Array<{ cluster: number; host: { size: number } }> }> } } }).layout;
  const f = layout.root.dirs[99].files[990];
  t.equal(f.host.size, 991);
  const buf = Buffer.alloc(4096);
  const geo = (node as unknown as { clusterOffset(c: number): number });
  await readAt(node, buf, geo.clusterOffset(f.cluster));
  t.equal(buf.subarray(0, 991).toString(), 'x'.repeat(991));
  t.ok(buf.subarray(991).every((b) => b === 0), 'zeros after the end of the file');
});
