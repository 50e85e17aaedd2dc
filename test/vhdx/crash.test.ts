// A log left dirty by qemu itself: qemu-io killed with SIGKILL while it allocates blocks.
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { openImage } from '../../lib/core/graph';
import { HEADER1, HEADER2, parseHeader } from '../../lib/formats/vhdx/format';
import { firstDiff, ourView, qemuImg, qemuImgStatus, qemuRaw, tmpdir } from '../qcow2/helpers';

async function killedWhileWriting(img: string, delayMs: number): Promise<void> {
  qemuImg('create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', img, '200M');
  const args = ['-f', 'vhdx'];
  for (let j = 0; j < 150; j++) args.push('-c', `write -P ${(j % 250) + 1} ${j}M 4k`);
  args.push(img);
  const p = spawn('qemu-io', args, { stdio: 'ignore' });
  await new Promise((r) => setTimeout(r, delayMs));
  p.kill('SIGKILL');
  await new Promise((r) => p.once('exit', r));
}

const logGuidSet = (img: string): boolean => {
  const b = fs.readFileSync(img);
  const hs = [parseHeader(b.subarray(HEADER1, HEADER1 + 4096)), parseHeader(b.subarray(HEADER2, HEADER2 + 4096))].filter((h) => h);
  const cur = hs.sort((a, c) => (a!.seq > c!.seq ? -1 : 1))[0]!;
  return cur.logGuid.some((x) => x !== 0);
};

t.test('a log qemu left behind is replayed like qemu replays it', async (t) => {
  const dir = tmpdir(t);
  const img = path.join(dir, 'k.vhdx');
  let dirty = false;
  for (let i = 0; i < 60 && !dirty; i++) {
    fs.rmSync(img, { force: true });
    await killedWhileWriting(img, 5 + ((i * 7) % 60));
    // qemu refuses a read-only open only when the log has a valid active sequence
    dirty = logGuidSet(img) && spawnSync('qemu-img', ['info', '-f', 'vhdx', img]).status !== 0;
  }
  if (!dirty) { t.plan(0, 'qemu-io was never killed inside a log update (60 tries)'); return; }
  const before = fs.readFileSync(img);
  const copy = path.join(dir, 'copy.vhdx');
  fs.copyFileSync(img, copy);
  const r = qemuImgStatus('check', '-r', 'all', '-f', 'vhdx', copy);
  t.match(r.out + r.err, /fixed|No errors/i, 'qemu replays its log');
  const expect = qemuRaw(dir, copy, ['-f', 'vhdx']);
  t.equal(firstDiff(await ourView(img, { format: 'vhdx' }), expect), -1, 'our read-only view equals qemu after replay');
  t.ok(fs.readFileSync(img).equals(before), 'read-only open leaves the file untouched');
  const n = await openImage(img, { format: 'vhdx' });
  await n.close();
  t.equal(qemuImgStatus('check', '-f', 'vhdx', img).code, 0, 'qemu-img check clean after our replay');
  t.equal(firstDiff(qemuRaw(dir, img, ['-f', 'vhdx']), expect), -1, 'qemu reads what it would have replayed');
  t.notOk(logGuidSet(img), 'log cleared');
});
