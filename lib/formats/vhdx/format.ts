// VHDX on-disk structures (Microsoft "VHDX Format Specification" v1.0): CRC-32C, GUIDs,
// headers, region table, metadata items, BAT entries, log entries.
import crypto from 'node:crypto';

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[i] = c >>> 0;
  }
  return t;
})();

/** CRC-32C (Castagnoli) of `buf`, with the 4 bytes at `skip` counted as zero. */
export function crc32c(buf: Uint8Array, skip = -1, crc = 0xffffffff): number {
  let c = crc;
  for (let i = 0; i < buf.length; i++) {
    const b = i >= skip && i < skip + 4 && skip >= 0 ? 0 : buf[i];
    c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  }
  return c >>> 0;
}
export const crcFinal = (c: number): number => (c ^ 0xffffffff) >>> 0;
export const checksum = (buf: Uint8Array, at = 4): number => crcFinal(crc32c(buf, at));

/** GUID text -> the 16 bytes as stored (first three fields little-endian) */
export function guid(s: string): Buffer {
  const h = s.replace(/-/g, '');
  const b = Buffer.from(h, 'hex');
  const out = Buffer.from(b);
  out.writeUInt32LE(b.readUInt32BE(0), 0);
  out.writeUInt16LE(b.readUInt16BE(4), 4);
  out.writeUInt16LE(b.readUInt16BE(6), 6);
  return out;
}
export function guidText(b: Uint8Array): string {
  const x = Buffer.from(b.buffer, b.byteOffset, 16);
  const h = (n: number, w: number): string => n.toString(16).padStart(w, '0');
  return `${h(x.readUInt32LE(0), 8)}-${h(x.readUInt16LE(4), 4)}-${h(x.readUInt16LE(6), 4)}-${x.subarray(8, 10).toString('hex')}-${x.subarray(10, 16).toString('hex')}`;
}
export function newGuid(): Buffer {
  const b = crypto.randomBytes(16);
  b[7] = (b[7] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  return b;
}
export const isZeroGuid = (b: Uint8Array): boolean => b.every((x) => x === 0);

export const KiB = 1024;
export const MiB = 1024 * 1024;
export const HEADER1 = 64 * KiB;
export const HEADER2 = 128 * KiB;
export const HEADER_SIZE = 4 * KiB;
export const REGION1 = 192 * KiB;
export const REGION2 = 256 * KiB;
export const REGION_SIZE = 64 * KiB;
export const MAX_REGION_ENTRIES = 2047;
export const MAX_METADATA_ENTRIES = 2047;
export const METADATA_TABLE_SIZE = 64 * KiB;
export const LOG_SECTOR = 4096;
export const MAX_BLOCK_SIZE = 256 * MiB;
export const MAX_IMAGE_SIZE = 64 * 1024 * 1024 * MiB; // 64 TiB
export const MAX_SECTORS_PER_BLOCK = 1 << 23;

export const BAT_GUID = guid('2DC27766-F623-4200-9D64-115E9BFD4A08');
export const METADATA_GUID = guid('8B7CA206-4790-4B9A-B8FE-575F050F886E');
export const FILE_PARAMS_GUID = guid('CAA16737-FA36-4D43-B3B6-33F0AA44E76B');
export const VDISK_SIZE_GUID = guid('2FA54224-CD1B-4876-B211-5DBED83BF4B8');
export const PAGE83_GUID = guid('BECA12AB-B2E6-4523-93EF-C309E000C746');
export const LSS_GUID = guid('8141BF1D-A96F-4709-BA47-F233A8FAAB5F');
export const PSS_GUID = guid('CDA348C7-445D-4471-9CC9-E9885251C556');
export const PARENT_LOCATOR_GUID = guid('A8D35F2D-B30B-454D-ABF7-D3D84834AB0C');
export const VHDX_PARENT_LOCATOR_TYPE = guid('B04AEFB7-D19E-4A81-B789-25B8E9445913');

// BAT entry states
export const PAYLOAD_NOT_PRESENT = 0;
export const PAYLOAD_UNDEFINED = 1;
export const PAYLOAD_ZERO = 2;
export const PAYLOAD_UNMAPPED = 3;
export const PAYLOAD_UNMAPPED_V095 = 5;
export const PAYLOAD_FULLY_PRESENT = 6;
export const PAYLOAD_PARTIALLY_PRESENT = 7;
export const SB_BLOCK_PRESENT = 6;

export interface Header {
  seq: bigint;
  fileWriteGuid: Buffer;
  dataWriteGuid: Buffer;
  logGuid: Buffer;
  logVersion: number;
  version: number;
  logLength: number;
  logOffset: number;
}

export function parseHeader(b: Buffer): Header | null {
  if (b.length < HEADER_SIZE || b.toString('latin1', 0, 4) !== 'head') return null;
  if (checksum(b.subarray(0, HEADER_SIZE)) !== b.readUInt32LE(4)) return null;
  const logOffset = b.readBigUInt64LE(72);
  return {
    seq: b.readBigUInt64LE(8),
    fileWriteGuid: Buffer.from(b.subarray(16, 32)),
    dataWriteGuid: Buffer.from(b.subarray(32, 48)),
    logGuid: Buffer.from(b.subarray(48, 64)),
    logVersion: b.readUInt16LE(64),
    version: b.readUInt16LE(66),
    logLength: b.readUInt32LE(68),
    logOffset: logOffset > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(logOffset),
  };
}

export function serializeHeader(h: Header): Buffer {
  const b = Buffer.alloc(HEADER_SIZE);
  b.write('head', 0, 'latin1');
  b.writeBigUInt64LE(h.seq, 8);
  h.fileWriteGuid.copy(b, 16);
  h.dataWriteGuid.copy(b, 32);
  h.logGuid.copy(b, 48);
  b.writeUInt16LE(h.logVersion, 64);
  b.writeUInt16LE(h.version, 66);
  b.writeUInt32LE(h.logLength, 68);
  b.writeBigUInt64LE(BigInt(h.logOffset), 72);
  b.writeUInt32LE(checksum(b), 4);
  return b;
}

/** the 64-byte log entry header */
export interface LogEntryHeader {
  entryLength: number;
  tail: number;
  seq: bigint;
  descriptorCount: number;
  logGuid: Buffer;
  flushedFileOffset: number;
  lastFileOffset: number;
}

export const descSectors = (count: number): number => Math.ceil((64 + 32 * count) / LOG_SECTOR) || 1;
