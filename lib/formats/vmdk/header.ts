// VMDK binary headers: hosted sparse (KDMV, VMDK4), ESX sparse (COWD, VMDK3), seSparse.
import { ImgError } from '../../core/errors';

export const SECTOR = 512;
export const VMDK4_MAGIC = 0x4b444d56; // 'KDMV' big-endian
export const VMDK3_MAGIC = 0x434f5744; // 'COWD'
export const FLAG_NL_DETECT = 1 << 0;
export const FLAG_RGD = 1 << 1;
export const FLAG_ZERO_GRAIN = 1 << 2;
export const FLAG_COMPRESS = 1 << 16;
export const FLAG_MARKER = 1 << 17;
export const COMPRESSION_DEFLATE = 1;
export const GD_AT_END = 0xffffffffffffffffn;
export const MARKER_EOS = 0;
export const MARKER_GT = 1;
export const MARKER_GD = 2;
export const MARKER_FOOTER = 3;
/** qemu's limits: 1 GiB grains, 512 GTEs per GT (VMDK4), 32M grain directory entries */
export const MAX_GRAIN_SECTORS = 0x200000;
export const MAX_L1_ENTRIES = 32 * 1024 * 1024;
export const MAX_CAPACITY_SECTORS = 2 ** 53 / SECTOR;

export interface Vmdk4Header {
  version: number;
  flags: number;
  capacity: number;
  granularity: number;
  descOffset: number;
  descSize: number;
  numGtesPerGt: number;
  rgdOffset: number;
  /** -1 = GD_AT_END */
  gdOffset: number;
  grainOffset: number;
  compressAlgorithm: number;
}

function u64(b: Buffer, at: number, what: string): number {
  const v = b.readBigUInt64LE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new ImgError('image', `vmdk: ${what} field is too large`);
  return Number(v);
}

/** parses the 512-byte sector that starts with the KDMV magic */
export function parseVmdk4(b: Buffer): Vmdk4Header {
  const gdRaw = b.readBigUInt64LE(56);
  return {
    version: b.readUInt32LE(4),
    flags: b.readUInt32LE(8),
    capacity: u64(b, 12, 'capacity'),
    granularity: u64(b, 20, 'granularity'),
    descOffset: u64(b, 28, 'descriptor offset'),
    descSize: u64(b, 36, 'descriptor size'),
    numGtesPerGt: b.readUInt32LE(44),
    rgdOffset: u64(b, 48, 'redundant grain directory offset'),
    gdOffset: gdRaw === GD_AT_END ? -1 : u64(b, 56, 'grain directory offset'),
    grainOffset: u64(b, 64, 'grain offset'),
    compressAlgorithm: b.readUInt16LE(77),
  };
}

export function serializeVmdk4(h: Vmdk4Header): Buffer {
  const b = Buffer.alloc(SECTOR);
  b.writeUInt32BE(VMDK4_MAGIC, 0);
  b.writeUInt32LE(h.version, 4);
  b.writeUInt32LE(h.flags >>> 0, 8);
  b.writeBigUInt64LE(BigInt(h.capacity), 12);
  b.writeBigUInt64LE(BigInt(h.granularity), 20);
  b.writeBigUInt64LE(BigInt(h.descOffset), 28);
  b.writeBigUInt64LE(BigInt(h.descSize), 36);
  b.writeUInt32LE(h.numGtesPerGt, 44);
  b.writeBigUInt64LE(BigInt(h.rgdOffset), 48);
  b.writeBigUInt64LE(h.gdOffset < 0 ? GD_AT_END : BigInt(h.gdOffset), 56);
  b.writeBigUInt64LE(BigInt(h.grainOffset), 64);
  b[72] = 0;
  b[73] = 0x0a; b[74] = 0x20; b[75] = 0x0d; b[76] = 0x0a;
  b.writeUInt16LE(h.compressAlgorithm, 77);
  return b;
}

/** a stream marker sector: value, size 0, type */
export function markerSector(val: number, type: number): Buffer {
  const b = Buffer.alloc(SECTOR);
  b.writeBigUInt64LE(BigInt(val), 0);
  b.writeUInt32LE(0, 8);
  b.writeUInt32LE(type, 12);
  return b;
}

export interface CowdHeader {
  version: number;
  flags: number;
  diskSectors: number;
  granularity: number;
  l1dirOffset: number;
  l1dirSize: number;
}

export function parseCowd(b: Buffer): CowdHeader {
  return {
    version: b.readUInt32LE(4),
    flags: b.readUInt32LE(8),
    diskSectors: b.readUInt32LE(12),
    granularity: b.readUInt32LE(16),
    l1dirOffset: b.readUInt32LE(20),
    l1dirSize: b.readUInt32LE(24),
  };
}

export const SESPARSE_CONST_MAGIC = 0xcafebaben;
export const SESPARSE_VOLATILE_MAGIC = 0xcafecafen;

export interface SeSparseHeader {
  capacity: number;
  grainSize: number;
  grainTableSize: number;
  volatileHeaderOffset: number;
  grainDirOffset: number;
  grainDirSize: number;
  grainTablesOffset: number;
  grainTablesSize: number;
  grainsOffset: number;
  grainsSize: number;
}

/** strict checks as qemu: the format is not publicly documented */
export function parseSeSparse(b: Buffer): SeSparseHeader {
  const q = (at: number): bigint => b.readBigUInt64LE(at);
  if (q(0) !== SESPARSE_CONST_MAGIC) throw new ImgError('image', 'vmdk: seSparse: bad const header magic');
  if (q(8) !== 0x0000000200000001n) throw new ImgError('image', `vmdk: seSparse: unsupported version 0x${q(8).toString(16)}`);
  if (q(24) !== 8n) throw new ImgError('image', `vmdk: seSparse: unsupported grain size ${q(24)}`);
  if (q(32) !== 64n) throw new ImgError('image', `vmdk: seSparse: unsupported grain table size ${q(32)}`);
  if (q(40) !== 0n) throw new ImgError('image', 'vmdk: seSparse: unsupported flags');
  for (let at = 48; at < 80; at += 8) if (q(at) !== 0n) throw new ImgError('image', 'vmdk: seSparse: unsupported reserved bits');
  for (let i = 208; i < 512; i++) if (b[i]) throw new ImgError('image', 'vmdk: seSparse: non-zero const header padding');
  return {
    capacity: u64(b, 16, 'seSparse capacity'),
    grainSize: 8,
    grainTableSize: 64,
    volatileHeaderOffset: u64(b, 80, 'seSparse volatile header offset'),
    grainDirOffset: u64(b, 128, 'seSparse grain directory offset'),
    grainDirSize: u64(b, 136, 'seSparse grain directory size'),
    grainTablesOffset: u64(b, 144, 'seSparse grain tables offset'),
    grainTablesSize: u64(b, 152, 'seSparse grain tables size'),
    grainsOffset: u64(b, 192, 'seSparse grains offset'),
    grainsSize: u64(b, 200, 'seSparse grains size'),
  };
}

export function checkSeSparseVolatile(b: Buffer): void {
  if (b.readBigUInt64LE(0) !== SESPARSE_VOLATILE_MAGIC) throw new ImgError('image', 'vmdk: seSparse: bad volatile header magic');
  if (b.readBigUInt64LE(24) !== 0n) throw new ImgError('unsupported', 'vmdk: seSparse: image is dirty, replaying the journal is not supported');
  for (let i = 32; i < 512; i++) if (b[i]) throw new ImgError('image', 'vmdk: seSparse: non-zero volatile header padding');
}
