// The synthesized metadata sectors: MBR, boot sector (FAT12/16 or FAT32 with FSInfo and
// backup), FAT entries generated from the cluster runs.
import type { Geometry } from './layout';

function chs(lba: number, g: Geometry): { b: number[]; overflow: boolean } {
  const sector = lba % g.secs;
  let rest = Math.floor(lba / g.secs);
  const head = rest % g.heads;
  rest = Math.floor(rest / g.heads);
  if (rest >= 1024) return { b: [0xff, 0xff, 0xff], overflow: true };
  return { b: [head, ((sector + 1) | ((rest >> 8) << 6)) & 0xff, rest & 0xff], overflow: false };
}

export function makeMbr(g: Geometry): Buffer {
  const b = Buffer.alloc(512);
  b.writeUInt32LE(0xbe1afdfa, 0x1b8); // disk signature, as qemu
  const p = 0x1be;
  b[p] = 0x80;
  const s = chs(g.partStart, g);
  const e = chs(g.totalSectors - 1, g);
  const lba = s.overflow || e.overflow;
  b.set(s.b, p + 1);
  b[p + 4] = g.fatType === 12 ? 0x01 : g.fatType === 16 ? (lba ? 0x0e : 0x06) : (lba ? 0x0c : 0x0b);
  b.set(e.b, p + 5);
  b.writeUInt32LE(g.partStart, p + 8);
  b.writeUInt32LE(g.partSectors, p + 12);
  b[510] = 0x55; b[511] = 0xaa;
  return b;
}

export const VOLUME_ID = 0xfabe1afd;

export function makeBootSector(g: Geometry, label: string, rootCluster: number): Buffer {
  const b = Buffer.alloc(512);
  const is32 = g.fatType === 32;
  b[0] = 0xeb; b[1] = is32 ? 0x58 : 0x3e; b[2] = 0x90;
  b.write('MSWIN4.1', 3, 'latin1');
  b.writeUInt16LE(512, 0x0b);
  b[0x0d] = g.spc;
  b.writeUInt16LE(g.reserved, 0x0e);
  b[0x10] = 2;
  b.writeUInt16LE(g.rootEntries, 0x11);
  b.writeUInt16LE(g.partSectors > 0xffff ? 0 : g.partSectors, 0x13);
  b[0x15] = g.media;
  b.writeUInt16LE(is32 ? 0 : g.spf, 0x16);
  b.writeUInt16LE(g.secs, 0x18);
  b.writeUInt16LE(g.heads, 0x1a);
  b.writeUInt32LE(g.partStart, 0x1c);
  b.writeUInt32LE(g.partSectors > 0xffff ? g.partSectors : 0, 0x20);
  let x = 0x24;
  if (is32) {
    b.writeUInt32LE(g.spf, 0x24);
    b.writeUInt16LE(0, 0x28); // both FATs mirrored
    b.writeUInt16LE(0, 0x2a);
    b.writeUInt32LE(rootCluster, 0x2c);
    b.writeUInt16LE(1, 0x30); // FSInfo
    b.writeUInt16LE(6, 0x32); // backup boot sector
    x = 0x40;
  }
  b[x] = g.floppy ? 0x00 : 0x80;
  b[x + 1] = 0;
  b[x + 2] = 0x29;
  b.writeUInt32LE(VOLUME_ID, x + 3);
  const lbl = Buffer.alloc(11, 0x20);
  lbl.write(label, 'latin1');
  lbl.copy(b, x + 7);
  b.write(is32 ? 'FAT32   ' : g.fatType === 16 ? 'FAT16   ' : 'FAT12   ', x + 18, 'latin1');
  // boot code: print nothing, hang (jmp $)
  const code = is32 ? 0x5a : 0x3e;
  b[code] = 0xeb; b[code + 1] = 0xfe;
  b[510] = 0x55; b[511] = 0xaa;
  return b;
}

export function makeFsInfo(freeClusters: number, nextFree: number): Buffer {
  const b = Buffer.alloc(512);
  b.writeUInt32LE(0x41615252, 0);
  b.writeUInt32LE(0x61417272, 484);
  b.writeUInt32LE(freeClusters >>> 0, 488);
  b.writeUInt32LE(nextFree >>> 0, 492);
  b.writeUInt32LE(0xaa550000, 508);
  return b;
}

export function eocOf(fatType: number): number {
  return fatType === 12 ? 0xfff : fatType === 16 ? 0xffff : 0x0fffffff;
}

/** first value that ends a chain (>= this is end of chain) */
export function eocMin(fatType: number): number {
  return fatType === 12 ? 0xff8 : fatType === 16 ? 0xfff8 : 0x0ffffff8;
}

/** Packs FAT entries [e0, e0+values.length) into bytes; e0 must be even for FAT12. */
export function packFat(fatType: number, values: Uint32Array): Buffer {
  if (fatType === 32) {
    const b = Buffer.alloc(values.length * 4);
    for (let i = 0; i < values.length; i++) b.writeUInt32LE(values[i] & 0x0fffffff, i * 4);
    return b;
  }
  if (fatType === 16) {
    const b = Buffer.alloc(values.length * 2);
    for (let i = 0; i < values.length; i++) b.writeUInt16LE(values[i] & 0xffff, i * 2);
    return b;
  }
  const b = Buffer.alloc(Math.ceil((values.length * 3) / 2) + 1);
  for (let i = 0; i < values.length; i++) {
    const v = values[i] & 0xfff;
    const o = (i * 3) >> 1;
    if (i & 1) { b[o] = (b[o] & 0x0f) | ((v & 0xf) << 4); b[o + 1] = v >> 4; }
    else { b[o] = v & 0xff; b[o + 1] = (b[o + 1] & 0xf0) | (v >> 8); }
  }
  return b;
}

/** Reads FAT entry `c` from a whole-FAT buffer. */
export function fatEntry(fatType: number, fat: Buffer, c: number): number {
  if (fatType === 32) return fat.readUInt32LE(c * 4) & 0x0fffffff;
  if (fatType === 16) return fat.readUInt16LE(c * 2);
  const o = (c * 3) >> 1;
  const v = fat[o] | (fat[o + 1] << 8);
  return c & 1 ? v >> 4 : v & 0xfff;
}
