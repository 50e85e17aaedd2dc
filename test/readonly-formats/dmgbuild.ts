// Builds small synthetic UDIF (dmg) images for the hostile-image tests.
import zlib from 'node:zlib';

export interface SynthChunk {
  type: number;
  sector: number;
  count: number;
  /** stored bytes (appended to the data fork) */
  data?: Buffer;
  /** override the stored offset/length written into the table */
  offset?: number;
  length?: number;
}

export interface SynthOptions {
  chunks: SynthChunk[];
  sectorCount: number;
  /** replaces the generated XML */
  xml?: string;
  /** number of chunks written in the mish header (default: chunks.length) */
  declaredChunks?: number;
  /** patch the koly trailer after it is built */
  koly?: (k: Buffer) => void;
  /** store the block table in an old-style binary resource fork instead of the XML plist */
  rsrc?: boolean;
  /** first sector of the mish block */
  firstSector?: number;
}

export function mish(o: SynthOptions, offsets: number[]): Buffer {
  const n = o.chunks.length;
  const b = Buffer.alloc(204 + 40 * (n + 1));
  b.write('mish', 0, 'latin1');
  b.writeUInt32BE(1, 4);
  b.writeBigUInt64BE(BigInt(o.firstSector ?? 0), 8);
  b.writeBigUInt64BE(BigInt(o.sectorCount), 16);
  b.writeUInt32BE((o.declaredChunks ?? n + 1) >>> 0, 200);
  o.chunks.forEach((c, i) => {
    const at = 204 + 40 * i;
    b.writeUInt32BE(c.type >>> 0, at);
    b.writeBigUInt64BE(BigInt(c.sector), at + 8);
    b.writeBigUInt64BE(BigInt(c.count), at + 16);
    b.writeBigUInt64BE(BigInt(c.offset ?? offsets[i]), at + 24);
    b.writeBigUInt64BE(BigInt(c.length ?? c.data?.length ?? 0), at + 32);
  });
  const end = 204 + 40 * n;
  b.writeUInt32BE(0xffffffff, end);
  b.writeBigUInt64BE(BigInt(o.sectorCount), end + 8);
  return b;
}

export function plistFor(blocks: Buffer[]): string {
  const entries = blocks.map((b, i) => `\t\t\t<dict>\n\t\t\t\t<key>Attributes</key>\n\t\t\t\t<string>0x0050</string>\n\t\t\t\t<key>Data</key>\n\t\t\t\t<data>\n${b.toString('base64').replace(/(.{52})/g, '\t\t\t\t$1\n')}\n\t\t\t\t</data>\n\t\t\t\t<key>ID</key>\n\t\t\t\t<string>${i - 1}</string>\n\t\t\t\t<key>Name</key>\n\t\t\t\t<string>part &amp; ${i} (Apple_HFS : ${i})</string>\n\t\t\t</dict>\n`).join('');
  return `<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n<plist version="1.0">\n<dict>\n\t<key>resource-fork</key>\n\t<dict>\n\t\t<key>blkx</key>\n\t\t<array>\n${entries}\t\t</array>\n\t\t<key>plst</key>\n\t\t<array/>\n\t</dict>\n</dict>\n</plist>\n`;
}

export function buildDmg(o: SynthOptions): Buffer {
  const parts: Buffer[] = [];
  const offsets: number[] = [];
  let pos = 0;
  for (const c of o.chunks) {
    offsets.push(pos);
    if (c.data) { parts.push(c.data); pos += c.data.length; }
  }
  const dataLen = pos;
  const table = mish(o, offsets);
  let meta: Buffer;
  if (o.rsrc) {
    // header (data offset, map offset, data length, map length), padding, then the resources
    const hdr = Buffer.alloc(256);
    hdr.writeUInt32BE(256, 0);
    hdr.writeUInt32BE(256 + 4 + table.length, 4);
    hdr.writeUInt32BE(4 + table.length, 8);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(table.length);
    meta = Buffer.concat([hdr, len, table]);
  } else meta = Buffer.from(o.xml ?? plistFor([table]), 'utf8');
  const xml = meta;
  const k = Buffer.alloc(512);
  k.write('koly', 0, 'latin1');
  k.writeUInt32BE(4, 4);
  k.writeUInt32BE(512, 8);
  k.writeUInt32BE(1, 12);
  k.writeBigUInt64BE(0n, 0x18);
  k.writeBigUInt64BE(BigInt(dataLen), 0x20);
  if (o.rsrc) {
    k.writeBigUInt64BE(BigInt(dataLen), 0x28);
    k.writeBigUInt64BE(BigInt(xml.length), 0x30);
  } else {
    k.writeBigUInt64BE(BigInt(dataLen), 0xd8);
    k.writeBigUInt64BE(BigInt(xml.length), 0xe0);
  }
  k.writeUInt32BE(1, 0x1e8);
  k.writeBigUInt64BE(BigInt(o.sectorCount), 0x1ec);
  o.koly?.(k);
  return Buffer.concat([...parts, xml, k]);
}

export const T = { zero: 0, raw: 1, ignore: 2, adc: 0x80000004, zlib: 0x80000005, bzip2: 0x80000006, lzfse: 0x80000007, lzma: 0x80000008, comment: 0x7ffffffe };

export function zlibChunk(data: Buffer): Buffer { return zlib.deflateSync(data); }
