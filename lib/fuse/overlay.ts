// Snapshot mode (-s): the image is opened read-only as the backing of a temporary qcow2
// overlay that takes every write; `imgmount commit <mountpoint>` copies the overlay into the
// image and empties it. The overlay file is unlinked as soon as it is open, so nothing is left
// behind whatever happens to the server.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import createDebug from 'debug';
import { ImgError } from '../core/errors';
import { openImage, OpenOptions } from '../core/graph';
import type { BlockNode, Extent, WriteFlags, ZeroFlags } from '../core/node';
import { createImage } from '../ops/create';
import { commitInto } from '../ops/commit';

const debug = createDebug('imgmount:overlay');

/** A read-only view of a node that can be replaced by a freshly opened one (after commit). */
export class SwitchableNode implements BlockNode {
  readonly driver: string;
  readonly readOnly = true;
  mapInvalidator = null;
  constructor(private inner: BlockNode) { this.driver = inner.driver; }
  get size(): number { return this.inner.size; }
  get align(): number { return this.inner.align; }
  get backing(): BlockNode | null { return this.inner.backing ?? null; }
  get file(): BlockNode | null { return this.inner.file ?? null; }
  get filename(): string { return this.inner.filename; }
  read(buf: Uint8Array, offset: number): Promise<void> { return this.inner.read(buf, offset); }
  blockStatus(offset: number, length: number): Promise<Extent> { return this.inner.blockStatus(offset, length); }
  allocatedSize(): Promise<number> { return this.inner.allocatedSize ? this.inner.allocatedSize() : Promise.resolve(0); }
  async close(): Promise<void> { await this.inner.close(); }
  /** installs `next` and returns the node it replaced (the caller closes it) */
  swap(next: BlockNode): BlockNode {
    const old = this.inner;
    this.inner = next;
    return old;
  }
  // writes never reach a backing node
  write?(_b: Uint8Array, _o: number, _f?: WriteFlags): Promise<void>;
  writeZeroes?(_o: number, _l: number, _f?: ZeroFlags): Promise<void>;
}

export interface SnapshotMode {
  top: BlockNode;
  /** commits the overlay into the image; the caller has stopped all I/O on `top` */
  commit(): Promise<void>;
}

export async function openSnapshotMode(image: string, o: OpenOptions): Promise<SnapshotMode> {
  const base = await openImage(image, { ...o, readOnly: true });
  const backing = new SwitchableNode(base);
  const dir = fs.mkdtempSync(path.join(process.env.TMPDIR || os.tmpdir(), 'imgmount-snapshot-'));
  const file = path.join(dir, 'overlay.qcow2');
  let top: BlockNode;
  try {
    await createImage({ format: 'qcow2', filename: file, size: base.size, options: { cluster_size: '65536' } });
    top = await openImage(file, { format: 'qcow2', readOnly: false, backingNode: backing, locking: 'off' });
  } catch (e) {
    await backing.close().catch(() => undefined);
    throw e;
  } finally {
    try { fs.rmSync(dir, { recursive: true, force: true }); } catch { /* best effort */ }
  }
  debug('overlay for %s open (unlinked)', image);
  const overlay = top;
  return {
    top: overlay,
    async commit(): Promise<void> {
      if (!overlay.makeEmpty) throw new ImgError('unsupported', 'the overlay cannot be emptied');
      await overlay.flush?.();
      // our own read-only open holds the locks that keep other writers out; the writer
      // shares this process's claim, so it skips locking
      const writer = await openImage(image, { ...o, readOnly: false, locking: 'off' });
      try {
        await commitInto(overlay, writer);
        await writer.flush?.();
      } finally {
        await writer.close();
      }
      const fresh = await openImage(image, { ...o, readOnly: true });
      const old = backing.swap(fresh);
      await old.close().catch((e) => debug('close old base: %s', (e as Error).message));
      await overlay.makeEmpty();
      await overlay.flush?.();
    },
  };
}
