// qcow2 header: parsing with qemu's limits, and serialisation (docs/interop/qcow2.txt).
import { ImgError } from '../../core/errors';

export const QCOW_MAGIC = 0x514649fb;
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** qemu: QCOW_MAX_L1_SIZE (bytes) */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
/** qemu: QCOW_MAX_REFTABLE_SIZE (bytes) */
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
/** qemu: QCOW_MAX_SNAPSHOTS_SIZE */
export const MAX_SNAPSHOTS_BYTES = 1024 * MAX_SNAPSHOTS;
export const V2_HEADER_LEN = 72;
export const V3_HEADER_LEN = 104;
export const V3_HEADER_LEN_COMPRESSION = 112;

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

export const EXT_END = 0;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export interface FeatureName { type: number; bit: number; name: string }

export interface Qcow2Header {
  version: number;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  backingFile: string | null;
  backingFormat: string | null;
  dataFile: string | null;
  featureNames: FeatureName[];
  /** extensions we do not interpret, kept when the header is rewritten */
  otherExtensions: { type: number; data: Buffer }[];
}

const bad = (msg: string): ImgError => new ImgError('image', msg);

function u64(b: Buffer, at: number, what: string): number {
  const v = b.readBigUInt64BE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw bad(`qcow2: ${what} is out of range`);
  return Number(v);
}

/** Parses and validates the header in `head` (the first cluster of the file, or the whole file). */
export function parseHeader(head: Buffer, fileSize: number): Qcow2Header {
  if (head.length < V2_HEADER_LEN || head.readUInt32BE(0) !== QCOW_MAGIC) throw bad('Image is not in qcow2 format');
  const version = head.readUInt32BE(4);
  if (version < 2 || version > 3) throw bad(`Unsupported qcow2 version ${version}`);
  const clusterBits = head.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) throw bad(`Unsupported cluster size: 2^${clusterBits}`);
  const cs = 2 ** clusterBits;
  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(head, 8, 'backing file offset'),
    backingFileSize: head.readUInt32BE(16),
    clusterBits,
    size: u64(head, 24, 'image size'),
    cryptMethod: head.readUInt32BE(32),
    l1Size: head.readUInt32BE(36),
    l1TableOffset: u64(head, 40, 'L1 table offset'),
    refcountTableOffset: u64(head, 48, 'refcount table offset'),
    refcountTableClusters: head.readUInt32BE(56),
    nbSnapshots: head.readUInt32BE(60),
    snapshotsOffset: u64(head, 64, 'snapshot table offset'),
    incompatible: 0n,
    compatible: 0n,
    autoclear: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_LEN,
    compressionType: 0,
    backingFile: null,
    backingFormat: null,
    dataFile: null,
    featureNames: [],
    otherExtensions: [],
  };
  if (version >= 3) {
    if (head.length < V3_HEADER_LEN) throw bad('qcow2 header too short');
    h.incompatible = head.readBigUInt64BE(72);
    h.compatible = head.readBigUInt64BE(80);
    h.autoclear = head.readBigUInt64BE(88);
    h.refcountOrder = head.readUInt32BE(96);
    h.headerLength = head.readUInt32BE(100);
    if (h.headerLength < V3_HEADER_LEN) throw bad('qcow2 header too short');
    if (h.headerLength > cs) throw bad('qcow2 header exceeds cluster size');
    if (h.headerLength > head.length) throw bad('qcow2 header is beyond the end of the file');
    if (h.headerLength > V3_HEADER_LEN) h.compressionType = head[104];
  }
  if (h.backingFileOffset > cs) throw bad('Invalid backing file offset');
  if (h.refcountOrder > 6) throw bad('Reference count entry width too large; may not exceed 64 bits');
  if (h.cryptMethod > 2) throw bad(`Unsupported encryption method: ${h.cryptMethod}`);

  // header extensions, between the header and the backing file name (or the cluster end)
  const extEnd = Math.min(h.backingFileOffset > 0 ? h.backingFileOffset : cs, head.length);
  let off = h.headerLength;
  while (off + 8 <= extEnd) {
    const type = head.readUInt32BE(off);
    const len = head.readUInt32BE(off + 4);
    off += 8;
    if (type === EXT_END) break;
    if (len > extEnd - off) throw bad('Header extension too large');
    const data = head.subarray(off, off + len);
    switch (type) {
      case EXT_BACKING_FORMAT:
        if (len >= 16) throw bad(`ERROR: ext_backing_format: len=${len} too large (>=16)`);
        h.backingFormat = data.toString('latin1');
        break;
      case EXT_FEATURE_TABLE:
        for (let i = 0; i + 48 <= len; i += 48) {
          const nm = data.subarray(i + 2, i + 48);
          const z = nm.indexOf(0);
          h.featureNames.push({ type: data[i], bit: data[i + 1], name: nm.subarray(0, z < 0 ? 46 : z).toString('latin1') });
        }
        break;
      case EXT_DATA_FILE:
        h.dataFile = data.toString('utf8');
        break;
      default:
        h.otherExtensions.push({ type, data: Buffer.from(data) });
    }
    off += Math.ceil(len / 8) * 8;
  }

  if (h.backingFileOffset > 0) {
    if (h.backingFileSize > 1023 || h.backingFileSize > cs - h.backingFileOffset) throw bad('Backing file name too long');
    if (h.backingFileOffset + h.backingFileSize > head.length) throw bad('qcow2: backing file name is beyond the end of the file');
    h.backingFile = head.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize).toString('utf8');
  }

  const unknown = h.incompatible & ~INCOMPAT_KNOWN;
  if (unknown) throw bad(`Unsupported qcow2 feature(s): ${featureList(h, 0, unknown)}`);
  if (h.compressionType > 1) throw bad(`Unknown compression type ${h.compressionType}`);
  if (h.compressionType !== 0 && !(h.incompatible & INCOMPAT_COMPRESSION)) {
    throw bad(`qcow2: Compression type ${h.compressionType} requires the compression type incompatible bit`);
  }
  if ((h.incompatible & INCOMPAT_EXTL2) && clusterBits < 14) throw bad('qcow2: extended L2 entries need at least 16 KiB clusters');

  // table limits (qemu's qcow2_do_open) and file bounds
  if (h.refcountTableClusters > MAX_REFTABLE_BYTES / cs) throw bad('Reference count table too large');
  if (h.refcountTableClusters === 0) throw bad('qcow2: the image has no refcount table');
  checkTable(h.refcountTableOffset, h.refcountTableClusters * cs, cs, fileSize, 'refcount table');
  if (h.nbSnapshots > MAX_SNAPSHOTS) throw bad('Too many snapshots');
  if (h.nbSnapshots > 0) checkTable(h.snapshotsOffset, 40 * h.nbSnapshots, cs, fileSize, 'snapshot table');
  if (h.l1Size > MAX_L1_BYTES / 8) throw bad('Active L1 table too large');
  const entryBits = (h.incompatible & INCOMPAT_EXTL2) ? 4 : 3;
  const l2Bits = clusterBits - entryBits;
  const needL1 = Math.ceil(h.size / 2 ** (clusterBits + l2Bits));
  if (needL1 > 0x7fffffff) throw bad('Image is too big');
  if (h.l1Size < needL1) throw bad('L1 table is too small');
  if (h.l1Size > 0) checkTable(h.l1TableOffset, h.l1Size * 8, cs, fileSize, 'L1 table');
  return h;
}

function checkTable(offset: number, bytes: number, cs: number, fileSize: number, what: string): void {
  if (offset % cs !== 0) throw bad(`Invalid ${what} offset`);
  if (offset === 0) throw bad(`Invalid ${what} offset`);
  if (offset + bytes > fileSize) throw bad(`qcow2: ${what} is beyond the end of the file`);
}

export function featureList(h: Qcow2Header, type: number, mask: bigint): string {
  const names: string[] = [];
  for (let bit = 0; bit < 64; bit++) {
    if (!(mask & (1n << BigInt(bit)))) continue;
    const f = h.featureNames.find((x) => x.type === type && x.bit === bit);
    names.push(f ? f.name : `Unknown incompatible feature: ${(1n << BigInt(bit)).toString(16)}`);
  }
  return names.join(', ');
}

export const FEATURE_TABLE: FeatureName[] = [
  { type: 0, bit: 0, name: 'dirty bit' },
  { type: 0, bit: 1, name: 'corrupt bit' },
  { type: 0, bit: 2, name: 'external data file' },
  { type: 0, bit: 3, name: 'compression type' },
  { type: 0, bit: 4, name: 'extended L2 entries' },
  { type: 1, bit: 0, name: 'lazy refcounts' },
  { type: 2, bit: 0, name: 'bitmaps' },
  { type: 2, bit: 1, name: 'raw external data' },
];

/** Serialises header + extensions + backing file name into one buffer (must fit a cluster). */
export function serializeHeader(h: Qcow2Header): Buffer {
  const cs = 2 ** h.clusterBits;
  const exts: Buffer[] = [];
  const ext = (type: number, data: Buffer): void => {
    const b = Buffer.alloc(8 + Math.ceil(data.length / 8) * 8);
    b.writeUInt32BE(type, 0);
    b.writeUInt32BE(data.length, 4);
    data.copy(b, 8);
    exts.push(b);
  };
  if (h.backingFormat) ext(EXT_BACKING_FORMAT, Buffer.from(h.backingFormat, 'latin1'));
  if (h.dataFile !== null) ext(EXT_DATA_FILE, Buffer.from(h.dataFile, 'utf8'));
  if (h.version >= 3) {
    const ft = Buffer.alloc(48 * FEATURE_TABLE.length);
    FEATURE_TABLE.forEach((f, i) => { ft[i * 48] = f.type; ft[i * 48 + 1] = f.bit; ft.write(f.name, i * 48 + 2, 'latin1'); });
    ext(EXT_FEATURE_TABLE, ft);
  }
  for (const o of h.otherExtensions) ext(o.type, o.data);
  ext(EXT_END, Buffer.alloc(0));
  const hlen = h.version >= 3 ? V3_HEADER_LEN_COMPRESSION : V2_HEADER_LEN;
  const extBuf = Buffer.concat(exts);
  const name = h.backingFile !== null ? Buffer.from(h.backingFile, 'utf8') : Buffer.alloc(0);
  const total = hlen + extBuf.length + name.length;
  if (total > cs) throw new ImgError('usage', 'qcow2: header extensions and backing file name do not fit in the first cluster');
  if (name.length > 1023) throw new ImgError('usage', 'Backing file name too long');
  const b = Buffer.alloc(total);
  b.writeUInt32BE(QCOW_MAGIC, 0);
  b.writeUInt32BE(h.version, 4);
  b.writeBigUInt64BE(BigInt(h.backingFile !== null ? hlen + extBuf.length : 0), 8);
  b.writeUInt32BE(h.backingFile !== null ? name.length : 0, 16);
  b.writeUInt32BE(h.clusterBits, 20);
  b.writeBigUInt64BE(BigInt(h.size), 24);
  b.writeUInt32BE(h.cryptMethod, 32);
  b.writeUInt32BE(h.l1Size, 36);
  b.writeBigUInt64BE(BigInt(h.l1TableOffset), 40);
  b.writeBigUInt64BE(BigInt(h.refcountTableOffset), 48);
  b.writeUInt32BE(h.refcountTableClusters, 56);
  b.writeUInt32BE(h.nbSnapshots, 60);
  b.writeBigUInt64BE(BigInt(h.snapshotsOffset), 64);
  if (h.version >= 3) {
    b.writeBigUInt64BE(h.incompatible, 72);
    b.writeBigUInt64BE(h.compatible, 80);
    b.writeBigUInt64BE(h.autoclear, 88);
    b.writeUInt32BE(h.refcountOrder, 96);
    b.writeUInt32BE(hlen, 100);
    b[104] = h.compressionType;
  }
  extBuf.copy(b, hlen);
  name.copy(b, hlen + extBuf.length);
  return b;
}
