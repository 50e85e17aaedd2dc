// imgmount snapshot: qemu-img snapshot -l/-c/-a/-d.
import { ImgError } from '../core/errors';
import { openImage, OpenOptions } from '../core/graph';
import type { SnapshotInfo } from '../core/node';

export type SnapshotAction = { op: 'list' } | { op: 'create' | 'apply' | 'delete'; tag: string };

export async function snapshotOp(spec: string, o: OpenOptions, action: SnapshotAction): Promise<SnapshotInfo[] | null> {
  const node = await openImage(spec, { ...o, readOnly: action.op === 'list', shareRw: action.op === 'list' });
  try {
    if (action.op === 'list') return node.snapshots ? await node.snapshots() : [];
    const fn = action.op === 'create' ? node.snapshotCreate : action.op === 'apply' ? node.snapshotApply : node.snapshotDelete;
    const verb = action.op === 'create' ? 'create' : action.op === 'apply' ? 'apply' : 'delete';
    if (!fn) throw new ImgError('unsupported', `Could not ${verb} snapshot '${action.tag}': the ${node.driver} format does not support internal snapshots`);
    await fn.call(node, action.tag);
    await node.flush?.();
    return null;
  } finally {
    await node.close();
  }
}
