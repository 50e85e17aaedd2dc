// When a write opens a stream: the first write at the start of an empty L2 table links a
// window after itself at once (the queue's next requests then find it mapped), a first
// write elsewhere does not; either way, what the guest never wrote is given back at flush.
import t from 'tap';
import path from 'node:path';
import { openImage } from '../../lib/core/graph';
import type { BlockNode, HostLocation } from '../../lib/core/node';
import { qemuImg, qemuImgStatus, tmpdir } from './helpers';

const KiB = 1024;
const MiB = 1 << 20;

interface Hint { offset: number; length: number; host: HostLocation }

/** writes [offset, length] pieces one after the other into a fresh 64 MiB qcow2, recording
 *  the windows the node links ahead (map hints) */
async function writeSeq(dir: string, name: string, writes: [number, number][]): Promise<{ hints: Hint[]; img: string }> {
  const img = path.join(dir, name);
  qemuImg('create', '-q', '-f', 'qcow2', img, '64M');
  const node: BlockNode = await openImage(img, { readOnly: false });
  const hints: Hint[] = [];
  node.mapInvalidator = () => undefined;
  node.mapHint = (offset, length, host) => { hints.push({ offset, length, host }); };
  try {
    for (const [at, len] of writes) await node.write!(Buffer.alloc(len, 0x5a), at);
    await node.flush?.();
  } finally {
    await node.close();
  }
  return { hints, img };
}

const firstWrite = (dir: string, name: string, at: number) => writeSeq(dir, name, [[at, 64 * KiB]]);

t.test('a first write at the start of an empty table links the window after it', async (t) => {
  const { hints, img } = await firstWrite(tmpdir(t), 'start.qcow2', 0);
  t.equal(hints.length, 1, 'one window linked');
  t.equal(hints[0]?.offset, 64 * KiB, 'the window begins right after the write');
  t.ok(hints[0] && hints[0].length >= MiB, `a window, not a cluster (${hints[0]?.length} bytes)`);
  t.ok(hints[0]?.host.writable && hints[0]?.host.notify, 'mapped writable, with the notification');
  const chk = qemuImgStatus('check', img);
  t.equal(chk.code, 0, `qemu-img check clean (the unwritten window was given back): ${chk.out}${chk.err}`);
  const map = JSON.parse(qemuImg('map', '--output', 'json', img)) as { start: number; length: number; data: boolean }[];
  t.same(map.filter((e) => e.data).map((e) => [e.start, e.length]), [[0, 64 * KiB]], 'qemu-img map: only what was written');
});

t.test('a first write elsewhere links nothing ahead', async (t) => {
  const { hints, img } = await firstWrite(tmpdir(t), 'middle.qcow2', 10 * MiB);
  t.equal(hints.length, 0, 'no window');
  t.equal(qemuImgStatus('check', img).code, 0, 'qemu-img check clean');
});

// random small writes into a filling disk often land right after allocated data; that alone
// must not link a window (the next random write would give it back at once)
t.test('a small write right after allocated data, far from the last write, links nothing', async (t) => {
  const { hints, img } = await writeSeq(tmpdir(t), 'random.qcow2', [[10 * MiB, 64 * KiB], [50 * MiB, 4 * KiB], [10 * MiB + 64 * KiB, 4 * KiB]]);
  t.equal(hints.length, 0, `no window (${JSON.stringify(hints.map((h) => [h.offset, h.length]))})`);
  t.equal(qemuImgStatus('check', img).code, 0, 'qemu-img check clean');
});

t.test('a write right after the last one, or a large one after allocated data, starts a stream', async (t) => {
  const d = tmpdir(t);
  const next = await writeSeq(d, 'next.qcow2', [[10 * MiB, 4 * KiB], [10 * MiB + 64 * KiB, 4 * KiB]]);
  t.equal(next.hints[0]?.offset, 10 * MiB + 128 * KiB, 'the window follows the second write');
  const large = await writeSeq(d, 'large.qcow2', [[10 * MiB, 64 * KiB], [50 * MiB, 4 * KiB], [10 * MiB + 64 * KiB, 256 * KiB]]);
  t.equal(large.hints[0]?.offset, 10 * MiB + 320 * KiB, 'the window follows the large write');
  for (const img of [next.img, large.img]) t.equal(qemuImgStatus('check', img).code, 0, `qemu-img check clean: ${path.basename(img)}`);
});
