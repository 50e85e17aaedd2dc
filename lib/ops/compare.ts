// imgmount compare: qemu-img compare (0 identical, 1 different, 2 error).
import { chainStatus, readAt } from '../core/io';
import { openImage, OpenOptions } from '../core/graph';
import type { BlockNode } from '../core/node';
import { Progress } from './progress';

const CHUNK = 2 << 20;

export interface CompareResult { identical: boolean; offset?: number; message: string }

function firstNonZero(b: Uint8Array): number {
  for (let i = 0; i < b.length; i++) if (b[i]) return i;
  return -1;
}

export async function compareNodes(a: BlockNode, b: BlockNode, strict = false, progress?: Progress): Promise<CompareResult> {
  if (strict && a.size !== b.size) return { identical: false, message: `Strict mode: Image size mismatch!` };
  const common = Math.min(a.size, b.size);
  const ba = Buffer.allocUnsafe(CHUNK);
  const bb = Buffer.allocUnsafe(CHUNK);
  let o = 0;
  while (o < common) {
    const [ea, eb] = await Promise.all([chainStatus(a, o, common - o), chainStatus(b, o, common - o)]);
    const len = Math.min(ea.length, eb.length, CHUNK);
    if (!ea.data && !eb.data && !strict) { o += len; progress?.update(o, common); continue; }
    const sa = ba.subarray(0, len);
    const sb = bb.subarray(0, len);
    await Promise.all([readAt(a, sa, o), readAt(b, sb, o)]);
    if (!sa.equals(sb)) {
      let i = 0;
      while (sa[i] === sb[i]) i++;
      // qemu reports the start of the first differing sector
      const at = o + i - ((o + i) % 512);
      return { identical: false, offset: at, message: `Content mismatch at offset ${at}!` };
    }
    o += len;
    progress?.update(o, Math.max(a.size, b.size));
  }
  const longer = a.size > b.size ? a : b;
  o = common;
  while (o < longer.size) {
    const e = await chainStatus(longer, o, longer.size - o);
    const len = Math.min(e.length, CHUNK);
    if (e.data) {
      const s = ba.subarray(0, len);
      await readAt(longer, s, o);
      const nz = firstNonZero(s);
      if (nz >= 0) {
        const at = o + nz - ((o + nz) % 512);
        return { identical: false, offset: at, message: `Content mismatch at offset ${at}!` };
      }
    }
    o += len;
  }
  progress?.done();
  return { identical: true, message: 'Images are identical.' };
}

export async function compareImages(f1: string, f2: string, o1: OpenOptions, o2: OpenOptions, strict: boolean, progress: boolean): Promise<CompareResult> {
  const a = await openImage(f1, { ...o1, readOnly: true, shareRw: true });
  try {
    const b = await openImage(f2, { ...o2, readOnly: true, shareRw: true });
    try {
      return await compareNodes(a, b, strict, new Progress(progress));
    } finally {
      await b.close();
    }
  } finally {
    await a.close();
  }
}
