// qcow2 consistency check: rebuilds the refcounts from every structure that references a
// cluster and compares them with the stored ones (qemu's qcow2_check_refcounts).
import { ImgError } from '../../core/errors';
import type { CheckResult } from '../../core/node';
import { INCOMPAT_CORRUPT } from './header';
import { cryptoExtension } from './crypto';
import { Qcow2Node } from './node';
import { entryOffset, maxRef, OFLAG_COPIED, readEntry } from './util';
import { writeSnapshotTableBuf } from './snapshot';

/** refuse to build a reference table for more clusters than this (memory bound) */
const MAX_CHECK_CLUSTERS = 256 * 1024 * 1024;

interface Walk {
  refs: Uint32Array;
  nb: number;
  res: CheckResult;
  allocated: number;
  fragmented: number;
  compressed: number;
  nextContiguous: number;
}

export async function checkQcow2(node: Qcow2Node, repair: 'none' | 'leaks' | 'all'): Promise<CheckResult> {
  // (after a repair, lib/ops/check.ts checks the image again, as qemu-img does)
  return checkOnce(node, repair);
}

async function checkOnce(node: Qcow2Node, repair: 'none' | 'leaks' | 'all'): Promise<CheckResult> {
  const cs = node.cs;
  const fileSize = node.file.size;
  const res: CheckResult = { checkErrors: 0, corruptions: 0, leaks: 0, corruptionsFixed: 0, leaksFixed: 0, messages: [] };
  const nbFile = Math.ceil(fileSize / cs);
  const nb = nbFile;
  if (nb > MAX_CHECK_CLUSTERS) throw new ImgError('image', 'qcow2: image too large to check');
  const w: Walk = { refs: new Uint32Array(nb), nb, res, allocated: 0, fragmented: 0, compressed: 0, nextContiguous: 0 };
  const msg = (m: string): void => { res.messages.push(m); };
  const inc = (off: number, len: number, what: string): void => {
    if (len <= 0) return;
    const a = Math.floor(off / cs);
    const b = Math.floor((off + len - 1) / cs);
    for (let c = a; c <= b; c++) {
      if (c >= w.nb) {
        msg(`ERROR: ${what} at offset 0x${(c * cs).toString(16)} is beyond the end of the image file`);
        res.corruptions++;
        return;
      }
      w.refs[c]++;
    }
  };

  // header, L1, refcount table, snapshot table
  inc(0, cs, 'header');
  const crypt = cryptoExtension(node.hdr);
  if (crypt) inc(crypt.offset, Math.ceil(crypt.length / cs) * cs, 'crypto header');
  inc(node.hdr.l1TableOffset, node.hdr.l1Size * 8, 'L1 table');
  await walkL1(node, w, node.hdr.l1TableOffset, node.hdr.l1Size, true, inc, msg);
  for (const sn of node.snapshotsList) {
    inc(sn.l1Offset, sn.l1Size * 8, 'snapshot L1 table');
    await walkL1(node, w, sn.l1Offset, sn.l1Size, false, inc, msg);
  }
  if (node.hdr.nbSnapshots) inc(node.hdr.snapshotsOffset, writeSnapshotTableBuf(node.snapshotsList).length, 'snapshot table');
  inc(node.hdr.refcountTableOffset, node.hdr.refcountTableClusters * cs, 'refcount table');
  for (let bi = 0; bi < node.refTableEntries; bi++) {
    const [hi, lo] = readEntry(node.refTable, bi * 8);
    const off = entryOffset(hi, lo);
    if (!off) continue;
    if (off % cs) {
      msg(`ERROR refcount block ${bi} is not cluster aligned; refcount table entry corrupted`);
      res.corruptions++;
      continue;
    }
    if (off >= fileSize) {
      msg(`ERROR refcount block ${bi} is outside image`);
      res.corruptions++;
      continue;
    }
    inc(off, cs, 'refcount block');
  }

  // compare
  const per = 2 ** node.rbShift;
  const fix = async (c: number, v: number): Promise<void> => {
    await node.setRefcount(c, v);
  };
  let highest = 0;
  const limit = Math.max(nb, 0);
  for (let c = 0; c < limit; c++) {
    const bi = Math.floor(c / per);
    let stored = 0;
    if (bi < node.refTableEntries) {
      const off = node.refTableEntry(bi);
      if (off && off % cs === 0 && off < fileSize) stored = await node.refcount(c);
    }
    const computed = w.refs[c];
    if (stored || computed) highest = c;
    if (stored === computed) continue;
    if (computed > maxRef(node.refOrder)) {
      msg(`ERROR cluster ${c} refcount=${stored} reference=${computed} (refcount overflow)`);
      res.corruptions++;
      continue;
    }
    if (stored < computed) {
      if (repair === 'all') {
        msg(`Repairing cluster ${c} refcount=${stored} reference=${computed}`);
        await fix(c, computed);
        res.corruptionsFixed++;
      } else {
        msg(`ERROR cluster ${c} refcount=${stored} reference=${computed}`);
        res.corruptions++;
      }
    } else if (repair === 'leaks' || repair === 'all') {
      msg(`Repairing cluster ${c} refcount=${stored} reference=${computed}`);
      await fix(c, computed);
      res.leaksFixed++;
    } else {
      msg(`Leaked cluster ${c} refcount=${stored} reference=${computed}`);
      res.leaks++;
    }
  }

  // QCOW_OFLAG_COPIED in the active tables
  await checkCopied(node, w, repair === 'all', msg);

  if (node.hdr.incompatible & INCOMPAT_CORRUPT && repair === 'all' && res.corruptions === 0) {
    node.hdr.incompatible &= ~INCOMPAT_CORRUPT;
    await node.writeFeatureBits();
  }
  if (repair !== 'none') await node.file.flush?.();

  res.imageEndOffset = (highest + 1) * cs;
  res.totalClusters = Math.ceil(node.size / cs);
  res.allocatedClusters = w.allocated;
  res.fragmentedClusters = w.fragmented;
  res.compressedClusters = w.compressed;
  return res;
}

async function walkL1(node: Qcow2Node, w: Walk, l1Off: number, l1Size: number, active: boolean,
  inc: (off: number, len: number, what: string) => void, msg: (m: string) => void): Promise<void> {
  const cs = node.cs;
  const l1 = Buffer.alloc(l1Size * 8);
  if (l1Size) await node.file.read(l1, l1Off);
  for (let i = 0; i < l1Size; i++) {
    const [hi, lo] = readEntry(l1, i * 8);
    let l2off: number;
    try { l2off = entryOffset(hi, lo); } catch { w.res.corruptions++; msg(`ERROR: L1 entry ${i} is out of range`); continue; }
    if (!l2off) continue;
    if (l2off % cs) {
      msg(`ERROR l2_offset=${l2off.toString(16)}: Table is not cluster aligned; L1 entry corrupted`);
      w.res.corruptions++;
      continue;
    }
    if (l2off >= node.file.size) {
      msg(`ERROR l2_offset=${l2off.toString(16)}: L2 table is outside the image file`);
      w.res.corruptions++;
      continue;
    }
    inc(l2off, cs, 'L2 table');
    const l2 = Buffer.alloc(cs);
    await node.file.read(l2, l2off);
    for (let k = 0; k < node.l2Entries; k++) {
      let inf;
      try { inf = node.decode(l2, k); } catch (e) {
        msg(`ERROR: ${(e as Error).message}`);
        w.res.corruptions++;
        continue;
      }
      if (inf.kind === 'compressed') {
        if (node.dataFile) { msg('ERROR: compressed cluster in an image with an external data file'); w.res.corruptions++; continue; }
        const r = node.compressedRange(inf);
        inc(r.off - (r.off & 511), r.nbBytes, 'compressed cluster');
        if (active) { w.allocated++; w.compressed++; w.fragmented++; }
        continue;
      }
      if (!inf.has) continue;
      if (inf.kind === 'zero' && node.hdr.version < 3 && !node.extL2) {
        msg(`ERROR: zero cluster in a version 2 image (L2 index ${k})`);
        w.res.corruptions++;
      }
      if (!node.dataFile) inc(inf.host, cs, 'data cluster');
      if (active) {
        w.allocated++;
        if (w.nextContiguous && inf.host !== w.nextContiguous) w.fragmented++;
        w.nextContiguous = inf.host + cs;
      }
    }
  }
}

async function checkCopied(node: Qcow2Node, w: Walk, fix: boolean, msg: (m: string) => void): Promise<void> {
  const cs = node.cs;
  const refOf = (off: number): number => (Math.floor(off / cs) < w.nb ? w.refs[Math.floor(off / cs)] : 0);
  for (let i = 0; i < node.l1.length / 8; i++) {
    const [hi, lo] = readEntry(node.l1, i * 8);
    let l2off: number;
    try { l2off = entryOffset(hi, lo); } catch { continue; }
    if (!l2off || l2off % cs || l2off >= node.file.size) continue;
    const want = refOf(l2off) === 1;
    const has = (hi & OFLAG_COPIED) !== 0;
    if (want !== has) {
      if (fix) {
        await node.setL1(i, l2off, want);
        w.res.corruptionsFixed++;
        msg(`Repairing OFLAG_COPIED L2 cluster: l1_index=${i} refcount=${refOf(l2off)}`);
      } else {
        msg(`ERROR OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${l2off.toString(16)} refcount=${refOf(l2off)}`);
        w.res.corruptions++;
      }
    }
    const l2 = Buffer.alloc(cs);
    await node.file.read(l2, l2off);
    let changed = false;
    for (let k = 0; k < node.l2Entries; k++) {
      let inf;
      try { inf = node.decode(l2, k); } catch { continue; }
      if (inf.kind === 'compressed' || !inf.has) continue;
      const rc = node.dataFile ? 1 : refOf(inf.host);
      const wantC = rc === 1;
      if (wantC !== inf.copied) {
        if (fix) {
          l2.writeUInt32BE(wantC ? (inf.hi | OFLAG_COPIED) >>> 0 : (inf.hi & ~OFLAG_COPIED) >>> 0, k * node.es);
          changed = true;
          w.res.corruptionsFixed++;
          msg(`Repairing OFLAG_COPIED data cluster: l2_entry=${inf.host.toString(16)} refcount=${rc}`);
        } else {
          msg(`ERROR OFLAG_COPIED data cluster: l2_entry=${inf.host.toString(16)} refcount=${rc}`);
          w.res.corruptions++;
        }
      }
    }
    if (changed) {
      await node.file.write!(l2, l2off);
      await node.resetCaches();
    }
  }
}
