// The one request path every caller uses (FUSE export, ops, tests): bounds and alignment
// checks, read-modify-write for unaligned requests, and generic backing-chain composition
// (an 'unallocated' extent reads from the backing node; past the backing's end reads zeros).
import { ImgError } from './errors';
import type { BlockNode, Extent, WriteFlags, ZeroFlags } from './node';

const ZERO_CHUNK = 1 << 20;
let zeroBuf: Buffer | null = null;
function zeros(len: number): Buffer {
  if (!zeroBuf) zeroBuf = Buffer.alloc(ZERO_CHUNK);
  return len <= ZERO_CHUNK ? zeroBuf.subarray(0, len) : Buffer.alloc(len);
}

function checkBounds(node: BlockNode, offset: number, length: number, what: string): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new ImgError('range', `${what}: invalid request offset ${offset} length ${length}`);
  }
  if (offset + length > node.size) {
    throw new ImgError('range', `${what}: request ${offset}+${length} is beyond the end of the image (${node.size} bytes)`);
  }
}

const isAligned = (node: BlockNode, offset: number, length: number): boolean =>
  node.align <= 1 || (offset % node.align === 0 && length % node.align === 0);

/** Reads `buf.length` bytes at `offset` of the node as the guest sees it, backing chain included. */
export async function readAt(node: BlockNode, buf: Uint8Array, offset: number): Promise<void> {
  checkBounds(node, offset, buf.length, 'read');
  if (buf.length === 0) return;
  if (isAligned(node, offset, buf.length)) return readChain(node, buf, offset);
  const a = node.align;
  const start = Math.floor(offset / a) * a;
  const end = Math.min(Math.ceil((offset + buf.length) / a) * a, alignUp(node.size, a));
  const bounce = Buffer.alloc(end - start);
  await readChain(node, bounce, start);
  buf.set(bounce.subarray(offset - start, offset - start + buf.length));
}

function alignUp(n: number, a: number): number { return Math.ceil(n / a) * a; }

/** Composes this layer with its backing chain; the request is in bounds and aligned. */
export async function readChain(node: BlockNode, buf: Uint8Array, offset: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const ext = await node.blockStatus(offset + done, buf.length - done);
    const len = Math.min(ext.length, buf.length - done);
    if (len <= 0) throw new ImgError('image', `${node.driver}: block status made no progress at offset ${offset + done}`);
    const sub = buf.subarray(done, done + len);
    if (ext.state === 'data') await node.read(sub, offset + done);
    else if (ext.state === 'zero') sub.fill(0);
    else await readBacking(node.backing ?? null, sub, offset + done);
    done += len;
  }
}

/** Reads from a backing node; the part past its end reads as zeros (qemu block/io.c). */
export async function readBacking(backing: BlockNode | null, buf: Uint8Array, offset: number): Promise<void> {
  if (!backing) { buf.fill(0); return; }
  const avail = Math.max(0, Math.min(buf.length, backing.size - offset));
  if (avail > 0) await readAt(backing, buf.subarray(0, avail), offset);
  if (avail < buf.length) buf.subarray(avail).fill(0);
}

// Unaligned writes read-modify-write whole aligned blocks; overlapping requests where
// either side does RMW are serialised so an RMW never writes back stale bytes.
interface Inflight { start: number; end: number; rmw: boolean; done: Promise<void> }
const inflight = new WeakMap<BlockNode, Set<Inflight>>();

async function withRange<T>(node: BlockNode, start: number, end: number, rmw: boolean, fn: () => Promise<T>): Promise<T> {
  let set = inflight.get(node);
  if (!set) { set = new Set(); inflight.set(node, set); }
  for (;;) {
    const blockers = [...set].filter((r) => r.start < end && start < r.end && (r.rmw || rmw));
    if (blockers.length === 0) break;
    await Promise.all(blockers.map((b) => b.done.catch(() => undefined)));
  }
  let release!: () => void;
  const entry: Inflight = { start, end, rmw, done: new Promise<void>((r) => { release = r; }) };
  set.add(entry);
  try {
    return await fn();
  } finally {
    set.delete(entry);
    release();
  }
}

function checkWritable(node: BlockNode, what: string): void {
  if (node.readOnly) throw new ImgError('readonly', `${what}: the image is opened read-only`);
}

export async function writeAt(node: BlockNode, buf: Uint8Array, offset: number, flags?: WriteFlags): Promise<void> {
  checkWritable(node, 'write');
  checkBounds(node, offset, buf.length, 'write');
  if (buf.length === 0) return;
  if (!node.write) throw new ImgError('unsupported', `write: the ${node.driver} driver cannot write`);
  const write = node.write.bind(node);
  if (isAligned(node, offset, buf.length)) {
    return withRange(node, offset, offset + buf.length, false, () => write(buf, offset, flags));
  }
  const a = node.align;
  const start = Math.floor(offset / a) * a;
  const end = Math.ceil((offset + buf.length) / a) * a;
  return withRange(node, start, end, true, async () => {
    const bounce = Buffer.alloc(end - start);
    await readChain(node, bounce, start);
    bounce.set(buf, offset - start);
    await write(bounce, start, flags);
  });
}

export async function writeZeroesAt(node: BlockNode, offset: number, length: number, flags?: ZeroFlags): Promise<void> {
  checkWritable(node, 'write zeroes');
  checkBounds(node, offset, length, 'write zeroes');
  if (length === 0) return;
  const a = node.align;
  // unaligned head and tail become explicit zero writes
  const head = a > 1 ? Math.min(length, (a - (offset % a)) % a) : 0;
  if (head > 0) await writeAt(node, zeros(head), offset);
  let o = offset + head;
  const endAligned = a > 1 ? Math.floor((offset + length) / a) * a : offset + length;
  if (endAligned > o) {
    if (node.writeZeroes) {
      await withRange(node, o, endAligned, false, () => node.writeZeroes!(o, endAligned - o, flags));
    } else {
      for (let p = o; p < endAligned; p += ZERO_CHUNK) {
        await writeAt(node, zeros(Math.min(ZERO_CHUNK, endAligned - p)), p);
      }
    }
    o = endAligned;
  }
  if (o < offset + length) await writeAt(node, zeros(offset + length - o), o);
}

export async function discardAt(node: BlockNode, offset: number, length: number): Promise<void> {
  checkWritable(node, 'discard');
  checkBounds(node, offset, length, 'discard');
  if (length === 0 || !node.discard) return; // discard is advisory, as in qemu
  const a = node.align;
  const s = a > 1 ? Math.ceil(offset / a) * a : offset;
  const e = a > 1 ? Math.floor((offset + length) / a) * a : offset + length;
  if (e > s) await withRange(node, s, e, false, () => node.discard!(s, e - s));
}

export async function flushNode(node: BlockNode): Promise<void> {
  if (node.flush) await node.flush();
}

/** This layer's status, clamped to the node's size. */
export async function blockStatusAt(node: BlockNode, offset: number, length: number): Promise<Extent> {
  checkBounds(node, offset, 0, 'block status');
  const len = Math.min(length, node.size - offset);
  if (len <= 0) return { offset, length: 0, state: 'zero' };
  const ext = await node.blockStatus(offset, len);
  return { ...ext, offset, length: Math.max(1, Math.min(ext.length, len)) };
}

export interface ChainExtent {
  offset: number;
  length: number;
  /** 'data' if any layer has data here, 'zero' if the topmost allocated layer reads zeros or nothing has it */
  data: boolean;
  zero: boolean;
  /** depth of the layer that answered (0 = top); -1 when no layer has the range */
  depth: number;
  /** the host location, when the answering layer has one */
  host?: Extent['host'];
  /** node that answered */
  node: BlockNode | null;
}

/** Block status through the whole backing chain (qemu's bdrv_block_status_above). */
export async function chainStatus(node: BlockNode, offset: number, length: number): Promise<ChainExtent> {
  let cur: BlockNode | null = node;
  let depth = 0;
  let len = Math.min(length, node.size - offset);
  while (cur) {
    if (offset >= cur.size) {
      return { offset, length: len, data: false, zero: true, depth: -1, node: null };
    }
    const ext = await blockStatusAt(cur, offset, len);
    len = Math.min(len, ext.length);
    if (ext.state !== 'unallocated') {
      return { offset, length: len, data: ext.state === 'data', zero: ext.state === 'zero', depth, host: ext.host, node: cur };
    }
    cur = cur.backing ?? null;
    depth++;
  }
  return { offset, length: len, data: false, zero: true, depth: -1, node: null };
}
