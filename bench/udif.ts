// A minimal UDIF (dmg) writer for the benchmark: UDZO, i.e. one partition whose chunks of
// 2048 sectors (1 MiB) are each zlib-compressed (type 0x80000005), all-zero chunks stored as
// type 0x00000002 (no data). Layout of the file: the data fork (the chunks, back to back),
// the XML property list (resource-fork > blkx > one dict whose Data is the mish block table),
// then the 512-byte koly trailer. Every integer is big-endian.
//
// koly (UDIFResourceFile, 512 bytes):
//   0x000 'koly'  0x004 version (4)  0x008 header size (512)  0x00c flags (1: flattened)
//   0x010 running data fork offset  0x018 data fork offset  0x020 data fork length
//   0x028 resource fork offset  0x030 resource fork length  0x038 segment number, 0x03c count
//   0x040 segment id (16 bytes)  0x050 data checksum type, 0x054 size (bits), 0x058 128 bytes
//   0x0d8 XML offset  0x0e0 XML length  0x0e8 120 reserved bytes
//   0x160 master checksum type, 0x164 size, 0x168 128 bytes  0x1e8 image variant
//   0x1ec sector count  0x1f4 12 reserved bytes
// mish (BLKXTable, 204 bytes + 40 per chunk):
//   0x000 'mish'  0x004 version (1)  0x008 first sector  0x010 sector count  0x018 data offset
//   0x020 buffers needed  0x024 block descriptors  0x028 24 reserved bytes
//   0x040 checksum type, 0x044 size, 0x048 128 bytes  0x0c8 number of chunks
//   0x0cc chunks: type, comment, sector, sector count, compressed offset, compressed length
//   (4 + 4 + 8 + 8 + 8 + 8); the last one is the terminator (type 0xffffffff).
//
// `node dist/bench/udif.js SRC OUT` converts a raw file (its size a multiple of 512).
import crypto from 'node:crypto';
import fs from 'node:fs';
import zlib from 'node:zlib';

const SECTOR = 512;
const CHUNK_SECTORS = 2048;
const CHUNK = CHUNK_SECTORS * SECTOR;
const TYPE_ZLIB = 0x80000005;
const TYPE_IGNORE = 0x00000002;
const TYPE_TERMINATOR = 0xffffffff;
const CHECKSUM_CRC32 = 2;

function crc32(b: Buffer, prev = 0): number {
  return (zlib as unknown as { crc32(d: Buffer, v?: number): number }).crc32(b, prev);
}

function checksum(buf: Buffer, at: number, crc: number): void {
  buf.writeUInt32BE(CHECKSUM_CRC32, at);
  buf.writeUInt32BE(32, at + 4);
  buf.writeUInt32BE(crc >>> 0, at + 8);
}

/** converts the raw file `src` into a UDZO dmg at `out`; returns the number of chunks */
export function writeUdif(src: string, out: string): number {
  const size = fs.statSync(src).size;
  if (size % SECTOR !== 0 || size === 0) throw new Error(`udif: ${src}: size ${size} is not a positive multiple of ${SECTOR}`);
  const sectors = size / SECTOR;
  const inFd = fs.openSync(src, 'r');
  const outFd = fs.openSync(out, 'w');
  try {
    const chunks: Array<{ type: number; sector: number; count: number; offset: number; length: number }> = [];
    const buf = Buffer.alloc(CHUNK);
    let pos = 0; // data fork write position (the data fork starts at 0)
    let dataCrc = 0; // of the data fork
    let rawCrc = 0; // of the uncompressed partition
    for (let sector = 0; sector < sectors; sector += CHUNK_SECTORS) {
      const count = Math.min(CHUNK_SECTORS, sectors - sector);
      const data = buf.subarray(0, count * SECTOR);
      let got = 0;
      while (got < data.length) {
        const n = fs.readSync(inFd, data, got, data.length - got, sector * SECTOR + got);
        if (n === 0) throw new Error(`udif: ${src}: short read`);
        got += n;
      }
      rawCrc = crc32(data, rawCrc);
      if (!data.some((x) => x !== 0)) {
        chunks.push({ type: TYPE_IGNORE, sector, count, offset: pos, length: 0 });
        continue;
      }
      const z = zlib.deflateSync(data);
      fs.writeSync(outFd, z, 0, z.length, pos);
      dataCrc = crc32(z, dataCrc);
      chunks.push({ type: TYPE_ZLIB, sector, count, offset: pos, length: z.length });
      pos += z.length;
    }
    const dataForkLength = pos;

    const mish = Buffer.alloc(204 + (chunks.length + 1) * 40);
    mish.write('mish', 0, 'latin1');
    mish.writeUInt32BE(1, 4);
    mish.writeBigUInt64BE(0n, 8); // first sector
    mish.writeBigUInt64BE(BigInt(sectors), 0x10);
    mish.writeBigUInt64BE(0n, 0x18); // data offset: chunk offsets are from the data fork start
    mish.writeUInt32BE(CHUNK_SECTORS + 8, 0x20); // buffers needed (sectors), as hdiutil
    mish.writeUInt32BE(0, 0x24); // block descriptors
    checksum(mish, 0x40, rawCrc);
    mish.writeUInt32BE(chunks.length + 1, 0xc8);
    const all = [...chunks, { type: TYPE_TERMINATOR, sector: sectors, count: 0, offset: pos, length: 0 }];
    all.forEach((c, i) => {
      const o = 0xcc + i * 40;
      mish.writeUInt32BE(c.type >>> 0, o);
      mish.writeUInt32BE(0, o + 4); // comment
      mish.writeBigUInt64BE(BigInt(c.sector), o + 8);
      mish.writeBigUInt64BE(BigInt(c.count), o + 16);
      mish.writeBigUInt64BE(BigInt(c.offset), o + 24);
      mish.writeBigUInt64BE(BigInt(c.length), o + 32);
    });

    const b64 = mish.toString('base64').replace(/.{1,52}/g, '\t\t\t\t$&\n');
    const xml = Buffer.from([
      '<?xml version="1.0" encoding="UTF-8"?>',
      '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">',
      '<plist version="1.0">',
      '<dict>',
      '\t<key>resource-fork</key>',
      '\t<dict>',
      '\t\t<key>blkx</key>',
      '\t\t<array>',
      '\t\t\t<dict>',
      '\t\t\t\t<key>Attributes</key>',
      '\t\t\t\t<string>0x0050</string>',
      '\t\t\t\t<key>CFName</key>',
      '\t\t\t\t<string>whole disk (Apple_HFS : 0)</string>',
      '\t\t\t\t<key>Data</key>',
      '\t\t\t\t<data>',
      b64 + '\t\t\t\t</data>',
      '\t\t\t\t<key>ID</key>',
      '\t\t\t\t<string>0</string>',
      '\t\t\t\t<key>Name</key>',
      '\t\t\t\t<string>whole disk (Apple_HFS : 0)</string>',
      '\t\t\t</dict>',
      '\t\t</array>',
      '\t</dict>',
      '</dict>',
      '</plist>',
      '',
    ].join('\n'), 'utf8');
    const xmlOffset = pos;
    fs.writeSync(outFd, xml, 0, xml.length, xmlOffset);
    pos += xml.length;

    const koly = Buffer.alloc(512);
    koly.write('koly', 0, 'latin1');
    koly.writeUInt32BE(4, 4); // version
    koly.writeUInt32BE(512, 8); // header size
    koly.writeUInt32BE(1, 0x0c); // flags: flattened
    koly.writeBigUInt64BE(0n, 0x10); // running data fork offset
    koly.writeBigUInt64BE(0n, 0x18); // data fork offset
    koly.writeBigUInt64BE(BigInt(dataForkLength), 0x20);
    koly.writeBigUInt64BE(0n, 0x28); // resource fork offset
    koly.writeBigUInt64BE(0n, 0x30); // resource fork length
    koly.writeUInt32BE(1, 0x38); // segment number
    koly.writeUInt32BE(1, 0x3c); // segment count
    crypto.randomBytes(16).copy(koly, 0x40); // segment id
    checksum(koly, 0x50, dataCrc);
    koly.writeBigUInt64BE(BigInt(xmlOffset), 0xd8);
    koly.writeBigUInt64BE(BigInt(xml.length), 0xe0);
    // master checksum: CRC32 of the block tables' checksums (here the only one)
    const sums = Buffer.alloc(4);
    sums.writeUInt32BE(rawCrc >>> 0, 0);
    checksum(koly, 0x160, crc32(sums));
    koly.writeUInt32BE(1, 0x1e8); // image variant: device image
    koly.writeBigUInt64BE(BigInt(sectors), 0x1ec);
    fs.writeSync(outFd, koly, 0, koly.length, pos);
    fs.ftruncateSync(outFd, pos + koly.length);
    return chunks.length;
  } finally {
    fs.closeSync(inFd);
    fs.closeSync(outFd);
  }
}

if (require.main === module) {
  const [src, out] = process.argv.slice(2);
  if (!src || !out) {
    process.stderr.write('usage: node dist/bench/udif.js SRC.raw OUT.dmg\n');
    process.exit(1);
  }
  const n = writeUdif(src, out);
  process.stderr.write(`${out}: ${n} chunks\n`);
}
