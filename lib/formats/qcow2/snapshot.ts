// The qcow2 snapshot table: parsing with qemu's limits, and serialisation.
import { ImgError } from '../../core/errors';
import type { BlockNode } from '../../core/node';
import { MAX_L1_BYTES, MAX_SNAPSHOTS_BYTES, Qcow2Header } from './header';

export interface Snapshot {
  l1Offset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  vmStateSize: number;
  diskSize: number;
  icount?: number;
  /** extra data beyond what we interpret (kept on rewrite) */
  extra: Buffer;
}

const MAX_EXTRA = 1024;
const bad = (m: string): ImgError => new ImgError('image', m);

export async function readSnapshotTable(file: BlockNode, h: Qcow2Header): Promise<Snapshot[]> {
  const list: Snapshot[] = [];
  if (!h.nbSnapshots) return list;
  const cs = 2 ** h.clusterBits;
  let off = h.snapshotsOffset;
  const fileSize = file.size;
  for (let i = 0; i < h.nbSnapshots; i++) {
    if (off - h.snapshotsOffset > MAX_SNAPSHOTS_BYTES) throw bad('Snapshot table too large');
    if (off + 40 > fileSize) throw bad('qcow2: snapshot table is beyond the end of the file');
    const fixed = Buffer.alloc(40);
    await file.read(fixed, off);
    const l1OffBig = fixed.readBigUInt64BE(0);
    const l1Size = fixed.readUInt32BE(8);
    const idLen = fixed.readUInt16BE(12);
    const nameLen = fixed.readUInt16BE(14);
    const extraLen = fixed.readUInt32BE(36);
    if (extraLen > MAX_EXTRA) throw bad('Too much extra metadata in snapshot table entry');
    const varLen = extraLen + idLen + nameLen;
    if (off + 40 + varLen > fileSize) throw bad('qcow2: snapshot table is beyond the end of the file');
    const v = Buffer.alloc(varLen);
    await file.read(v, off + 40);
    if (l1OffBig > BigInt(Number.MAX_SAFE_INTEGER)) throw bad('Snapshot L1 table offset invalid');
    const l1Offset = Number(l1OffBig);
    if (l1Size > MAX_L1_BYTES / 8) throw bad('Snapshot L1 table too large');
    if (l1Size && (l1Offset % cs || l1Offset === 0 || l1Offset + l1Size * 8 > fileSize)) throw bad('Snapshot L1 table offset invalid');
    const extra = v.subarray(0, extraLen);
    const sn: Snapshot = {
      l1Offset, l1Size,
      id: v.subarray(extraLen, extraLen + idLen).toString('utf8'),
      name: v.subarray(extraLen + idLen, varLen).toString('utf8'),
      dateSec: fixed.readUInt32BE(16),
      dateNsec: fixed.readUInt32BE(20),
      vmClockNsec: Number(fixed.readBigUInt64BE(24)),
      vmStateSize: fixed.readUInt32BE(32),
      diskSize: h.size,
      extra: Buffer.from(extra.subarray(Math.min(extraLen, 24))),
    };
    if (extraLen >= 8) {
      const big = extra.readBigUInt64BE(0);
      if (big > 0n) sn.vmStateSize = Number(big);
    }
    if (extraLen >= 16) sn.diskSize = Number(extra.readBigUInt64BE(8));
    if (extraLen >= 24) {
      const ic = extra.readBigInt64BE(16);
      if (ic >= 0n) sn.icount = Number(ic);
    }
    list.push(sn);
    off += 40 + varLen;
    off = Math.ceil(off / 8) * 8;
  }
  return list;
}

export function writeSnapshotTableBuf(list: Snapshot[]): Buffer {
  const parts: Buffer[] = [];
  for (const s of list) {
    const id = Buffer.from(s.id, 'utf8');
    const name = Buffer.from(s.name, 'utf8');
    const extra = Buffer.alloc(24 + s.extra.length);
    extra.writeBigUInt64BE(BigInt(s.vmStateSize), 0);
    extra.writeBigUInt64BE(BigInt(s.diskSize), 8);
    extra.writeBigInt64BE(s.icount === undefined ? -1n : BigInt(s.icount), 16);
    s.extra.copy(extra, 24);
    const len = Math.ceil((40 + extra.length + id.length + name.length) / 8) * 8;
    const b = Buffer.alloc(len);
    b.writeBigUInt64BE(BigInt(s.l1Offset), 0);
    b.writeUInt32BE(s.l1Size, 8);
    b.writeUInt16BE(id.length, 12);
    b.writeUInt16BE(name.length, 14);
    b.writeUInt32BE(s.dateSec >>> 0, 16);
    b.writeUInt32BE(s.dateNsec >>> 0, 20);
    b.writeBigUInt64BE(BigInt(s.vmClockNsec), 24);
    b.writeUInt32BE(Math.min(s.vmStateSize, 0xffffffff), 32);
    b.writeUInt32BE(extra.length, 36);
    extra.copy(b, 40);
    id.copy(b, 40 + extra.length);
    name.copy(b, 40 + extra.length + id.length);
    parts.push(b);
  }
  return Buffer.concat(parts);
}
