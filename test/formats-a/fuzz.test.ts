// Damaged images: random bytes in the header and tables must give ImgError (or valid data),
// never another exception, a hang or a huge allocation.
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { ImgError } from '../../lib/core/errors';
import { openImage } from '../../lib/core/graph';
import { readAt, writeAt } from '../../lib/core/io';
import { checkImage } from '../../lib/ops/check';
import { qemuImg, qemuIo, rng, tmpdir } from './helpers';

// where the metadata of a small image lies: [start, end) ranges worth damaging
const formats: Array<[string, string[], (b: Buffer) => Array<[number, number]>]> = [
  ['qed', ['-o', 'cluster_size=4k'], (b) => {
    const l1 = Number(b.readBigUInt64LE(40));
    const l2 = Number(b.readBigUInt64LE(l1));
    return [[0, 64], [l1, l1 + 16], [l2, l2 + 8 * 80], [l2 + 8 * 250, l2 + 8 * 260]];
  }],
  ['vdi', [], () => [[0x140, 0x200], [0x200, 0x208]]],
  ['qcow', [], (b) => {
    const l1 = Number(b.readBigUInt64BE(40));
    const l2 = Number(b.readBigUInt64BE(l1));
    return [[0, 48], [l1, l1 + 8], [l2, l2 + 8 * 80], [l2 + 8 * 250, l2 + 8 * 260]];
  }],
  ['parallels', ['-o', 'cluster_size=4k'], () => [[0, 64], [64, 64 + 4 * 80], [64 + 4 * 250, 64 + 4 * 260]]],
];

async function exercise(img: string, fmt: string, writable: boolean): Promise<void> {
  const n = await openImage(img, { format: fmt, readOnly: !writable });
  try {
    const b = Buffer.alloc(Math.min(n.size, 1 << 20));
    for (let o = 0; b.length && o + b.length <= Math.min(n.size, 4 << 20); o += b.length) await readAt(n, b, o);
    if (writable && n.size > 10000) await writeAt(n, Buffer.alloc(5000, 3), 3000);
  } finally {
    await n.close();
  }
}

for (const [fmt, opts, ranges] of formats) {
  t.test(`${fmt}: damaged metadata gives image errors only`, async (t) => {
    const dir = tmpdir(t);
    const good = path.join(dir, `good.${fmt}`);
    qemuImg('create', '-q', '-f', fmt, ...opts, good, '2M');
    qemuIo(good, ['write -P 0x5a 0 300k', 'write -P 0x5b 1M 64k'], ['-f', fmt]);
    const orig = fs.readFileSync(good);
    const r = rng(fmt.length * 1000 + 7);
    const where = ranges(orig);
    let others = 0;
    let imageErrors = 0;
    const img = path.join(dir, `bad.${fmt}`);
    for (let i = 0; i < Number(process.env.FUZZ_ITER ?? 30); i++) {
      const b = Buffer.from(orig);
      const flips = 1 + Math.floor(r() * 6);
      for (let k = 0; k < flips; k++) {
        const [s0, s1] = where[Math.floor(r() * where.length)];
        const at = s0 + Math.floor(r() * (s1 - s0));
        b[at] = r() < 0.5 ? Math.floor(r() * 256) : b[at] ^ (1 << Math.floor(r() * 8));
      }
      for (const writable of [false, true]) {
        fs.writeFileSync(img, b);
        try {
          await exercise(img, fmt, writable);
        } catch (e) {
          if (e instanceof ImgError) imageErrors++;
          else { others++; t.fail(`iteration ${i}: ${(e as Error).stack}`); }
        }
      }
      try {
        await checkImage(img, { format: fmt }, 'none');
      } catch (e) {
        if (!(e instanceof ImgError)) { others++; t.fail(`check, iteration ${i}: ${(e as Error).stack}`); }
      }
    }
    t.equal(others, 0, 'only ImgError');
    t.ok(imageErrors > 0, `some damage was detected (${imageErrors})`);
  });
}
