// LUKS1 on-disk format (LUKS On-Disk Format Specification 1.2.3): header parsing with the
// limits qemu's crypto/block-luks.c applies, key slot unlocking, and creation with qemu's
// layout. Works through a small I/O interface so that the luks driver and qcow2's
// full-disk-encryption header both use it.
import crypto from 'node:crypto';
import { ImgError } from '../core/errors';
import { afMerge, afSplit } from './af';
import { CipherAlg, validKeyLen } from './cipher';
import { CipherMode, HashAlg, hashLen, isHashAlg, IvGenAlg, modeString, parseCipherSpec, SectorCipher, SectorCipherSpec } from './modes';
import { pbkdf2, pbkdf2Iterations } from './pbkdf';

export const LUKS_MAGIC = Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);
export const LUKS1_HEADER_SIZE = 592;
export const SECTOR = 512;
const NUM_SLOTS = 8;
const STRIPES = 4000;
const SLOT_ENABLED = 0x00ac71f3;
const SLOT_DISABLED = 0x0000dead;
const KEY_SLOT_OFFSET = 4096;
/** a hostile header must not make us spin for hours in PBKDF2 */
export const MAX_ITERATIONS = 1 << 27;

export interface HeaderIO {
  /** bytes available for the header (file size, or the qcow2 header extension's length) */
  size: number;
  read(buf: Uint8Array, offset: number): Promise<void>;
}

export interface Luks1Slot { active: boolean; iterations: number; salt: Buffer; keyOffset: number; stripes: number }

export interface Luks1Header {
  version: 1;
  cipherName: string;
  cipherMode: string;
  hashSpec: HashAlg;
  spec: SectorCipherSpec;
  payloadOffset: number; // bytes
  keyBytes: number;
  mkDigest: Buffer;
  mkDigestSalt: Buffer;
  mkDigestIter: number;
  uuid: string;
  slots: Luks1Slot[];
}

export interface UnlockedVolume {
  version: 1 | 2;
  cipher: SectorCipher;
  /** payload start in bytes */
  payloadOffset: number;
  /** fixed payload length (LUKS2 segments with a size), null: to the end of the file */
  payloadSize: number | null;
  sectorSize: number;
  /** sector number of the payload's first sector (LUKS2 iv_tweak) */
  ivOffset: number;
  /** qemu-img info's format-specific data */
  info: Record<string, unknown>;
  masterKey: Buffer;
}

function cstr(b: Buffer, off: number, len: number, what: string): string {
  const f = b.subarray(off, off + len);
  const z = f.indexOf(0);
  if (z < 0) throw new ImgError('image', `LUKS header: ${what} is not NUL-terminated`);
  const s = f.subarray(0, z).toString('latin1');
  if (!/^[\x20-\x7e]*$/.test(s)) throw new ImgError('image', `LUKS header: ${what} is not printable`);
  return s;
}

export function parseLuks1(h: Buffer, fileSize: number, requirePayloadInFile: boolean): Luks1Header {
  if (h.length < LUKS1_HEADER_SIZE || !h.subarray(0, 6).equals(LUKS_MAGIC)) throw new ImgError('image', 'Volume is not in LUKS format');
  const version = h.readUInt16BE(6);
  if (version !== 1) throw new ImgError('image', `LUKS version ${version} is not supported by the LUKS1 parser`);
  const cipherName = cstr(h, 8, 32, 'cipher name');
  const cipherMode = cstr(h, 40, 32, 'cipher mode');
  const hashSpec = cstr(h, 72, 32, 'hash spec').toLowerCase();
  if (!isHashAlg(hashSpec)) throw new ImgError('image', `LUKS header: unsupported hash '${hashSpec}'`);
  const spec = parseCipherSpec(cipherName, cipherMode);
  const payloadSectors = h.readUInt32BE(104);
  const keyBytes = h.readUInt32BE(108);
  const cipherKey = spec.mode === 'xts' ? keyBytes / 2 : keyBytes;
  if (!Number.isInteger(cipherKey) || !validKeyLen(spec.alg, cipherKey)) {
    throw new ImgError('image', `LUKS header: key length ${keyBytes} does not fit ${cipherName}-${cipherMode}`);
  }
  const mkDigestIter = h.readUInt32BE(164);
  if (mkDigestIter === 0 || mkDigestIter > MAX_ITERATIONS) throw new ImgError('image', `LUKS header: master key iteration count ${mkDigestIter} is out of range`);
  const uuid = cstr(h, 168, 40, 'uuid');
  const payloadOffset = payloadSectors * SECTOR;
  if (requirePayloadInFile && payloadOffset > fileSize) {
    throw new ImgError('image', `LUKS header: payload offset ${payloadOffset} is beyond the end of the file (${fileSize} bytes)`);
  }
  const splitLen = keyBytes * STRIPES;
  const slots: Luks1Slot[] = [];
  for (let i = 0; i < NUM_SLOTS; i++) {
    const o = 208 + i * 48;
    const state = h.readUInt32BE(o);
    if (state !== SLOT_ENABLED && state !== SLOT_DISABLED) throw new ImgError('image', `LUKS header: key slot ${i} has invalid state 0x${state.toString(16)}`);
    const slot: Luks1Slot = {
      active: state === SLOT_ENABLED,
      iterations: h.readUInt32BE(o + 4),
      salt: Buffer.from(h.subarray(o + 8, o + 40)),
      keyOffset: h.readUInt32BE(o + 40) * SECTOR,
      stripes: h.readUInt32BE(o + 44),
    };
    if (slot.stripes !== STRIPES) throw new ImgError('image', `LUKS header: key slot ${i} has ${slot.stripes} stripes (expected ${STRIPES})`);
    if (slot.keyOffset < LUKS1_HEADER_SIZE) throw new ImgError('image', `LUKS header: key slot ${i} overlaps the header`);
    const end = slot.keyOffset + Math.ceil(splitLen / SECTOR) * SECTOR;
    if (payloadOffset > 0 && end > payloadOffset) throw new ImgError('image', `LUKS header: key slot ${i} overlaps the payload`);
    if (end > fileSize) throw new ImgError('image', `LUKS header: key slot ${i} is beyond the end of the header area`);
    if (slot.active && (slot.iterations === 0 || slot.iterations > MAX_ITERATIONS)) {
      throw new ImgError('image', `LUKS header: key slot ${i} iteration count ${slot.iterations} is out of range`);
    }
    slots.push(slot);
  }
  for (let i = 0; i < NUM_SLOTS; i++) {
    for (let j = i + 1; j < NUM_SLOTS; j++) {
      const a = slots[i], b = slots[j];
      const len = Math.ceil(splitLen / SECTOR) * SECTOR;
      if (a.keyOffset < b.keyOffset + len && b.keyOffset < a.keyOffset + len) {
        throw new ImgError('image', `LUKS header: key slots ${i} and ${j} overlap`);
      }
    }
  }
  return {
    version: 1, cipherName, cipherMode, hashSpec, spec, payloadOffset, keyBytes,
    mkDigest: Buffer.from(h.subarray(112, 132)), mkDigestSalt: Buffer.from(h.subarray(132, 164)), mkDigestIter, uuid, slots,
  };
}

export function cipherAlgName(spec: SectorCipherSpec, keyBytes: number): string {
  return `${spec.alg}-${(spec.mode === 'xts' ? keyBytes / 2 : keyBytes) * 8}`;
}

export function luks1Info(hd: Luks1Header): Record<string, unknown> {
  // key order and units as qemu-img info prints them (QCryptoBlockInfoLUKS)
  const info: Record<string, unknown> = {
    'ivgen-alg': hd.spec.ivgen ?? 'plain64',
    'hash-alg': hd.hashSpec,
    'cipher-alg': cipherAlgName(hd.spec, hd.keyBytes),
    uuid: hd.uuid,
  };
  if (hd.spec.ivgen === 'essiv') info['ivgen-hash-alg'] = hd.spec.ivHash;
  Object.assign(info, {
    'cipher-mode': hd.spec.mode,
    slots: hd.slots.map((s) => (s.active
      ? { active: true, iters: s.iterations, 'key-offset': s.keyOffset, stripes: s.stripes }
      : { active: false, 'key-offset': s.keyOffset })),
    'payload-offset': hd.payloadOffset,
    'master-key-iters': hd.mkDigestIter,
  });
  return info;
}

/** tries every active key slot with the passphrase; throws 'crypto' when none opens */
export async function unlockLuks1(hd: Luks1Header, io: HeaderIO, pass: Buffer): Promise<UnlockedVolume> {
  const splitLen = hd.keyBytes * STRIPES;
  const matLen = Math.ceil(splitLen / SECTOR) * SECTOR;
  for (const slot of hd.slots) {
    if (!slot.active) continue;
    const derived = await pbkdf2(hd.hashSpec, pass, slot.salt, slot.iterations, hd.keyBytes);
    const mat = Buffer.alloc(matLen);
    await io.read(mat, slot.keyOffset);
    new SectorCipher(hd.spec, derived, SECTOR).decrypt(mat, 0);
    const mk = afMerge(mat, hd.keyBytes, STRIPES, hd.hashSpec);
    const digest = await pbkdf2(hd.hashSpec, mk, hd.mkDigestSalt, hd.mkDigestIter, 20);
    if (crypto.timingSafeEqual(digest, hd.mkDigest)) {
      return {
        version: 1, cipher: new SectorCipher(hd.spec, mk, SECTOR), payloadOffset: hd.payloadOffset, payloadSize: null,
        sectorSize: SECTOR, ivOffset: 0, info: luks1Info(hd), masterKey: mk,
      };
    }
  }
  throw new ImgError('crypto', 'Invalid password, cannot unlock any keyslot');
}

export interface LuksCreateOptions {
  cipherAlg: CipherAlg;
  cipherKeyBits: number;
  cipherMode: CipherMode;
  ivgenAlg: IvGenAlg;
  ivgenHashAlg: HashAlg;
  hashAlg: HashAlg;
  iterTimeMs: number;
}

export const DEFAULT_CREATE: LuksCreateOptions = {
  cipherAlg: 'aes', cipherKeyBits: 256, cipherMode: 'xts', ivgenAlg: 'plain64', ivgenHashAlg: 'sha256', hashAlg: 'sha256', iterTimeMs: 2000,
};

/** Builds a LUKS1 header + key material area (payloadOffset bytes); the caller writes it at 0. */
export async function createLuks1(o: LuksCreateOptions, pass: Buffer): Promise<{ area: Buffer; payloadOffset: number; volume: UnlockedVolume }> {
  const spec: SectorCipherSpec = {
    // qemu writes "ecb-plain64" too (and cannot parse a bare "ecb"); the IV is unused there
    alg: o.cipherAlg, mode: o.cipherMode, ivgen: o.ivgenAlg,
    ivHash: o.ivgenAlg === 'essiv' ? o.ivgenHashAlg : undefined,
  };
  if (spec.ivgen === 'essiv' && !validKeyLen(spec.alg, hashLen(o.ivgenHashAlg))) {
    throw new ImgError('usage', `luks: ivgen-hash-alg ${o.ivgenHashAlg} gives a ${hashLen(o.ivgenHashAlg)}-byte key that ${o.cipherAlg} cannot use for ESSIV`);
  }
  const keyBytes = (o.cipherKeyBits / 8) * (o.cipherMode === 'xts' ? 2 : 1);
  const mk = crypto.randomBytes(keyBytes);
  // qemu: the PBKDF2 rate for iter-time; the master key digest gets an eighth (as cryptsetup)
  const iters = pbkdf2Iterations(o.hashAlg, keyBytes, o.iterTimeMs);
  const mkIters = Math.min(Math.max(Math.floor(iters / 8), 1000), MAX_ITERATIONS);
  const slotIters = Math.min(Math.max(iters, 1000), MAX_ITERATIONS);
  const splitLen = keyBytes * STRIPES;
  const splitSectors = Math.ceil(splitLen / 4096) * 4096 / SECTOR;
  const headerSectors = KEY_SLOT_OFFSET / SECTOR;
  const payloadSectors = headerSectors + NUM_SLOTS * splitSectors;
  const area = Buffer.alloc(payloadSectors * SECTOR);
  LUKS_MAGIC.copy(area, 0);
  area.writeUInt16BE(1, 6);
  area.write(o.cipherAlg, 8, 'latin1');
  area.write(modeString(spec), 40, 'latin1');
  area.write(o.hashAlg, 72, 'latin1');
  area.writeUInt32BE(payloadSectors, 104);
  area.writeUInt32BE(keyBytes, 108);
  const mkSalt = crypto.randomBytes(32);
  (await pbkdf2(o.hashAlg, mk, mkSalt, mkIters, 20)).copy(area, 112);
  mkSalt.copy(area, 132);
  area.writeUInt32BE(mkIters, 164);
  area.write(crypto.randomUUID(), 168, 'latin1');
  for (let i = 0; i < NUM_SLOTS; i++) {
    const so = 208 + i * 48;
    const keyOffset = headerSectors + i * splitSectors;
    area.writeUInt32BE(SLOT_DISABLED, so);
    area.writeUInt32BE(keyOffset, so + 40);
    area.writeUInt32BE(STRIPES, so + 44);
  }
  // key slot 0 holds the passphrase
  const salt = crypto.randomBytes(32);
  const derived = await pbkdf2(o.hashAlg, pass, salt, slotIters, keyBytes);
  const mat = Buffer.alloc(Math.ceil(splitLen / SECTOR) * SECTOR);
  afSplit(mk, STRIPES, o.hashAlg).copy(mat, 0);
  new SectorCipher(spec, derived, SECTOR).encrypt(mat, 0);
  area.writeUInt32BE(SLOT_ENABLED, 208);
  area.writeUInt32BE(slotIters, 212);
  salt.copy(area, 216);
  mat.copy(area, headerSectors * SECTOR);
  const hd = parseLuks1(area, area.length, true);
  return {
    area, payloadOffset: payloadSectors * SECTOR,
    volume: { version: 1, cipher: new SectorCipher(spec, mk, SECTOR), payloadOffset: payloadSectors * SECTOR, payloadSize: null,
      sectorSize: SECTOR, ivOffset: 0, info: luks1Info(hd), masterKey: mk },
  };
}

/** parses qemu's luks create options (prefix '' for the luks driver, 'encrypt.' for qcow2) */
export function parseCreateOptions(get: (k: string) => string | undefined): LuksCreateOptions {
  const o = { ...DEFAULT_CREATE };
  const alg = get('cipher-alg');
  if (alg !== undefined) {
    const m = /^(aes|twofish|serpent)-(128|192|256)$/.exec(alg);
    if (!m) throw new ImgError('usage', `luks: invalid cipher-alg '${alg}' (aes-128/192/256, twofish-128/192/256, serpent-128/192/256)`);
    o.cipherAlg = m[1] as CipherAlg;
    o.cipherKeyBits = Number(m[2]);
  }
  const mode = get('cipher-mode');
  if (mode !== undefined) {
    if (!['xts', 'cbc', 'ecb', 'ctr'].includes(mode)) throw new ImgError('usage', `luks: invalid cipher-mode '${mode}' (xts, cbc, ecb, ctr)`);
    o.cipherMode = mode as CipherMode;
  }
  const ivgen = get('ivgen-alg');
  if (ivgen !== undefined) {
    if (!['plain', 'plain64', 'essiv'].includes(ivgen)) throw new ImgError('usage', `luks: invalid ivgen-alg '${ivgen}' (plain, plain64, essiv)`);
    o.ivgenAlg = ivgen as IvGenAlg;
  }
  const ivh = get('ivgen-hash-alg');
  if (ivh !== undefined) {
    if (!isHashAlg(ivh)) throw new ImgError('usage', `luks: invalid ivgen-hash-alg '${ivh}'`);
    o.ivgenHashAlg = ivh;
  }
  const h = get('hash-alg');
  if (h !== undefined) {
    if (!isHashAlg(h)) throw new ImgError('usage', `luks: invalid hash-alg '${h}' (sha1, sha224, sha256, sha384, sha512, ripemd160)`);
    o.hashAlg = h;
  }
  const it = get('iter-time');
  if (it !== undefined) {
    if (!/^\d+$/.test(it) || Number(it) < 1 || Number(it) > 3600000) throw new ImgError('usage', `luks: invalid iter-time '${it}' (milliseconds)`);
    o.iterTimeMs = Number(it);
  }
  return o;
}
