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

async function firstWrite(dir: string, name: string, at: number): Promise<{ hints: Hint[]; img: string }> {
  const img = path.join(dir, name);
  qemuImg('create', '-q', '-f', 'qcow2', img, '64M');
  const node: BlockNode = await openImage(img, { readOnly: false });
  const hints: Hint[] = [];
  node.mapInvalidator = () => undefined;
  node.mapHint = (offset, length, host) => { hints.push({ offset, length, host }); };
  try {
    await node.write!(Buffer.alloc(64 * KiB, 0x5a), at);
    await node.flush?.();
  } finally {
    await node.close();
  }
  return { hints, img };
}

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
