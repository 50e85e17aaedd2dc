// The VHDX metadata log: finding the active sequence of a dirty log, replaying it (to the
// file, or into an in-memory overlay for read-only opens), and writing one entry.
import { ImgError } from '../../core/errors';
import type { BlockNode } from '../../core/node';
import { checksum, crc32c, crcFinal, descSectors, LOG_SECTOR, MiB } from './format';

/** one replay operation: 4 KiB of data or a zeroed range */
export interface LogOp { offset: number; length: number; data: Buffer | null }

export interface LogSequence { ops: LogOp[]; lastFileOffset: number; lastSeq: bigint; entries: number }

/** the largest log we read into memory (qemu's default is 1 MiB; Hyper-V uses 1 MiB too) */
export const MAX_LOG_BYTES = 64 * MiB;
/** replayed offsets must stay below this (VHDX's 64 TiB payload plus metadata) */
const MAX_FILE_OFFSET = 2 ** 47;

interface Entry { pos: number; length: number; seq: bigint; ops: LogOp[]; lastFileOffset: number }

/** reads `len` bytes of the circular log starting at `pos` */
function circ(log: Buffer, pos: number, len: number): Buffer {
  if (pos + len <= log.length) return log.subarray(pos, pos + len);
  return Buffer.concat([log.subarray(pos), log.subarray(0, len - (log.length - pos))]);
}

function parseEntry(log: Buffer, pos: number, logGuid: Buffer): Entry | null {
  const hdr = circ(log, pos, 64);
  if (hdr.toString('latin1', 0, 4) !== 'loge') return null;
  const length = hdr.readUInt32LE(8);
  const tail = hdr.readUInt32LE(12);
  const seq = hdr.readBigUInt64LE(16);
  const count = hdr.readUInt32LE(24);
  if (!hdr.subarray(32, 48).equals(logGuid)) return null;
  if (length === 0 || length % LOG_SECTOR !== 0 || length > log.length) return null;
  if (tail % LOG_SECTOR !== 0 || tail >= log.length || seq === 0n) return null;
  const sectors = length / LOG_SECTOR;
  if (count > sectors * (LOG_SECTOR / 32)) return null;
  const dsec = descSectors(count);
  if (dsec > sectors) return null;
  const entry = circ(log, pos, length);
  if (checksum(entry) !== entry.readUInt32LE(4)) return null;
  const lastFileOffset = entry.readBigUInt64LE(56);
  if (lastFileOffset > BigInt(MAX_FILE_OFFSET)) return null;
  const ops: LogOp[] = [];
  let dataIdx = 0;
  for (let i = 0; i < count; i++) {
    const d = entry.subarray(64 + 32 * i, 96 + 32 * i);
    const sig = d.toString('latin1', 0, 4);
    const fileOffset = d.readBigUInt64LE(16);
    if (d.readBigUInt64LE(24) !== seq) return null;
    if (fileOffset % BigInt(LOG_SECTOR) !== 0n || fileOffset > BigInt(MAX_FILE_OFFSET)) return null;
    const off = Number(fileOffset);
    if (sig === 'zero') {
      const zl = d.readBigUInt64LE(8);
      if (zl % BigInt(LOG_SECTOR) !== 0n || zl > BigInt(MAX_FILE_OFFSET) || off + Number(zl) > MAX_FILE_OFFSET) return null;
      ops.push({ offset: off, length: Number(zl), data: null });
    } else if (sig === 'desc') {
      const s = dsec + dataIdx++;
      if (s >= sectors) return null;
      const ds = entry.subarray(s * LOG_SECTOR, (s + 1) * LOG_SECTOR);
      if (ds.toString('latin1', 0, 4) !== 'data') return null;
      const dseq = (BigInt(ds.readUInt32LE(4)) << 32n) | BigInt(ds.readUInt32LE(4092));
      if (dseq !== seq) return null;
      const data = Buffer.alloc(LOG_SECTOR);
      d.copy(data, 0, 8, 16); // leading bytes
      ds.copy(data, 8, 8, 4092);
      d.copy(data, 4092, 4, 8); // trailing bytes
      ops.push({ offset: off, length: LOG_SECTOR, data });
    } else return null;
  }
  if (dsec + dataIdx !== sectors) return null;
  return { pos, length, seq, ops, lastFileOffset: Number(lastFileOffset) };
}

/** The active sequence of a log (qemu's vhdx_log_search): the chain of valid entries with
 *  consecutive sequence numbers that ends with the highest sequence number. */
export async function searchLog(file: BlockNode, logOffset: number, logLength: number, logGuid: Buffer): Promise<LogSequence | null> {
  if (logLength > MAX_LOG_BYTES) throw new ImgError('unsupported', `vhdx: the log is too large to replay (${logLength} bytes)`);
  const log = Buffer.alloc(logLength);
  await file.read(log, logOffset);
  const valid = new Map<number, Entry | null>();
  const at = (p: number): Entry | null => {
    if (!valid.has(p)) valid.set(p, parseEntry(log, p, logGuid));
    return valid.get(p)!;
  };
  let best: Entry[] | null = null;
  // an entry that continues an earlier chain only starts a suffix of it (same last entry,
  // never better): skipping those keeps the search linear in the log size
  const continued = new Set<number>();
  for (let p = 0; p < logLength; p += LOG_SECTOR) {
    if (continued.has(p)) continue;
    const e = at(p);
    if (!e) continue;
    const chain = [e];
    const seen = new Set<number>([p]);
    for (;;) {
      const last = chain[chain.length - 1];
      const np = (last.pos + last.length) % logLength;
      if (seen.has(np)) break;
      const n = at(np);
      if (!n || n.seq !== last.seq + 1n) break;
      chain.push(n);
      seen.add(np);
      continued.add(np);
    }
    if (!best || chain[chain.length - 1].seq > best[best.length - 1].seq) best = chain;
  }
  if (!best) return null;
  const ops = best.flatMap((e) => e.ops);
  return { ops, lastFileOffset: best[best.length - 1].lastFileOffset, lastSeq: best[best.length - 1].seq, entries: best.length };
}

/** Applies a sequence to the file (read-write replay). */
export async function replayToFile(file: BlockNode, seq: LogSequence): Promise<void> {
  for (const op of seq.ops) {
    if (op.data) await file.write!(op.data, op.offset);
    else {
      // zeroing past the end of the file is a no-op (it reads as zeros; the file is extended
      // sparsely below): a hostile length cannot make us write terabytes
      const len = Math.max(0, Math.min(op.length, file.size - op.offset));
      for (let o = 0; o < len; o += MiB) {
        const n = Math.min(MiB, len - o);
        if (file.writeZeroes && op.offset + o + n <= file.size) await file.writeZeroes(op.offset + o, n);
        else await file.write!(Buffer.alloc(n), op.offset + o);
      }
    }
  }
  let reach = seq.lastFileOffset;
  for (const o of seq.ops) if (o.data && o.offset + o.length > reach) reach = o.offset + o.length;
  if (file.size < reach) {
    if (!file.truncate) throw new ImgError('unsupported', 'vhdx: cannot extend the file to replay the log');
    await file.truncate(Math.ceil(reach / MiB) * MiB);
  }
  await file.flush?.();
}

/** A read view of the file with a replayed log laid over it (read-only opens of dirty images). */
export class Overlay {
  constructor(private file: BlockNode, private ops: LogOp[], readonly minSize: number) {}
  get size(): number { return Math.max(this.file.size, this.minSize); }
  intersects(offset: number, length: number): boolean {
    return this.ops.some((o) => o.offset < offset + length && offset < o.offset + o.length);
  }
  async read(buf: Uint8Array, offset: number): Promise<void> {
    await this.file.read(buf, offset);
    const end = offset + buf.length;
    for (const op of this.ops) {
      const s = Math.max(op.offset, offset);
      const e = Math.min(op.offset + op.length, end);
      if (s >= e) continue;
      if (op.data) buf.set(op.data.subarray(s - op.offset, e - op.offset), s - offset);
      else buf.fill(0, s - offset, e - offset);
    }
  }
}

/** Builds one log entry that writes `sectors` (4 KiB aligned, 4 KiB long) at the log start. */
export function buildEntry(sectors: { offset: number; data: Buffer }[], seq: bigint, logGuid: Buffer, fileSize: number): Buffer {
  const count = sectors.length;
  const dsec = descSectors(count);
  const len = (dsec + count) * LOG_SECTOR;
  const b = Buffer.alloc(len);
  b.write('loge', 0, 'latin1');
  b.writeUInt32LE(len, 8);
  b.writeUInt32LE(0, 12); // tail: this entry is the whole active sequence
  b.writeBigUInt64LE(seq, 16);
  b.writeUInt32LE(count, 24);
  logGuid.copy(b, 32);
  b.writeBigUInt64LE(BigInt(fileSize), 48);
  b.writeBigUInt64LE(BigInt(fileSize), 56);
  sectors.forEach((s, i) => {
    const d = b.subarray(64 + 32 * i, 96 + 32 * i);
    d.write('desc', 0, 'latin1');
    s.data.copy(d, 4, 4092, 4096);
    s.data.copy(d, 8, 0, 8);
    d.writeBigUInt64LE(BigInt(s.offset), 16);
    d.writeBigUInt64LE(seq, 24);
    const ds = b.subarray((dsec + i) * LOG_SECTOR, (dsec + i + 1) * LOG_SECTOR);
    ds.write('data', 0, 'latin1');
    ds.writeUInt32LE(Number(seq >> 32n), 4);
    s.data.copy(ds, 8, 8, 4092);
    ds.writeUInt32LE(Number(seq & 0xffffffffn), 4092);
  });
  b.writeUInt32LE(crcFinal(crc32c(b, 4)), 4);
  return b;
}
