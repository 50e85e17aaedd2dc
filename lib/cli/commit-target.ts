// `commit` takes an image file, or the mountpoint of a snapshot-mode (-s) mount.
import fs from 'node:fs';
import path from 'node:path';
import { ImgError } from '../core/errors';
import type { OpenOptions } from '../core/graph';
import { findMount } from '../fuse/runtime';
import { controlRequest } from '../fuse/control';

export async function commitTarget(target: string, o: OpenOptions, keep: boolean, progress: boolean,
  commitImage: (spec: string, o: OpenOptions, keep: boolean, progress: boolean) => Promise<void>): Promise<void> {
  const abs = path.resolve(target);
  if (fs.existsSync(abs) && fs.statSync(abs).isDirectory()) {
    if (!findMount(abs)) throw new ImgError('usage', `commit ${abs}: not a mountpoint`);
    await controlRequest(abs, { op: 'commit' });
    return;
  }
  await commitImage(target, o, keep, progress);
}
