// imgmount commit FILE: write an image's own data into its backing file, then empty it
// (qemu-img commit's default).
import { ImgError } from '../core/errors';
import { blockStatusAt, readAt, writeAt } from '../core/io';
import { openImage, OpenOptions } from '../core/graph';
import type { BlockNode } from '../core/node';
import { Progress } from './progress';

const CHUNK = 2 << 20;

/** Copies every range the top layer itself holds into `base` (the top's backing). */
export async function commitInto(top: BlockNode, base: BlockNode, progress?: Progress): Promise<void> {
  const buf = Buffer.allocUnsafe(CHUNK);
  let o = 0;
  while (o < top.size) {
    const ext = await blockStatusAt(top, o, top.size - o);
    const len = Math.min(ext.length, CHUNK);
    if (ext.state !== 'unallocated' && o < base.size) {
      const n = Math.min(len, base.size - o);
      const b = buf.subarray(0, n);
      await readAt(top, b, o);
      await writeAt(base, b, o);
    }
    o += len;
    progress?.update(o, top.size);
  }
  await base.flush?.();
  progress?.done();
}

export async function commitImage(spec: string, o: OpenOptions, keep: boolean, progress: boolean): Promise<void> {
  const probe = await openImage(spec, { ...o, readOnly: true, noBacking: true });
  let backingName: string | undefined;
  let backingFmt: string | undefined;
  try {
    const extra = probe.infoExtra ? await probe.infoExtra() : {};
    backingName = extra['full-backing-filename'] as string | undefined;
    backingFmt = extra['backing-filename-format'] as string | undefined;
  } finally {
    await probe.close();
  }
  if (!backingName) throw new ImgError('usage', `Image '${spec}' does not have a backing file`);
  const base = await openImage(backingName, { format: backingFmt, readOnly: false, secrets: o.secrets, locking: o.locking });
  try {
    const top = await openImage(spec, { ...o, readOnly: false, options: { ...(o.options ?? {}), backing: 'null' } });
    try {
      if (!keep && !top.makeEmpty) throw new ImgError('unsupported', `the ${top.driver} format cannot be emptied after commit`);
      await commitInto(top, base, new Progress(progress));
      if (!keep) await top.makeEmpty!();
      await top.flush?.();
    } finally {
      await top.close();
    }
  } finally {
    await base.close();
  }
}
