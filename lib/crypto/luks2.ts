// LUKS2 (cryptsetup's on-disk format, docs/on-disk-format-luks2.pdf): two binary headers with
// checksums and sequence ids, a JSON metadata area (bounded: at most 4 MiB, as the format
// allows), pbkdf2 / argon2i / argon2id keyslots with the LUKS1 AF splitter, pbkdf2 digests and
// crypt segments. Read-only as far as metadata is concerned: the payload can be written.
import crypto from 'node:crypto';
import { ImgError } from '../core/errors';
import { afMerge } from './af';
import { validKeyLen } from './cipher';
import type { HeaderIO, UnlockedVolume } from './luks1';
import { MAX_ITERATIONS } from './luks1';
import { HashAlg, isHashAlg, parseCipherSpec, SectorCipher, SectorCipherSpec } from './modes';
import { argon2, pbkdf2 } from './pbkdf';

const BIN_SIZE = 4096;
const HDR_SIZES = [0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000];
const MAGIC1 = Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]);
const MAGIC2 = Buffer.from([0x53, 0x4b, 0x55, 0x4c, 0xba, 0xbe]);
/** argon2 limits: cryptsetup's own maximum memory is 4 GiB; we refuse more than 1 GiB */
const MAX_ARGON_MEMORY_KIB = 1 << 20;
const MAX_ARGON_TIME = 1000;
const MAX_KEY = 512;
const MAX_STRIPES = 4000;

const bad = (m: string): ImgError => new ImgError('image', `LUKS2 header: ${m}`);

interface BinHeader { seqid: bigint; hdrSize: number; json: unknown; offset: number }

async function readHeaderAt(io: HeaderIO, offset: number, magic: Buffer): Promise<BinHeader | null> {
  if (offset + BIN_SIZE > io.size) return null;
  const bin = Buffer.alloc(BIN_SIZE);
  await io.read(bin, offset);
  if (!bin.subarray(0, 6).equals(magic) || bin.readUInt16BE(6) !== 2) return null;
  const hs = bin.readBigUInt64BE(8);
  const hdrSize = Number(hs);
  if (!HDR_SIZES.includes(hdrSize) || offset + hdrSize > io.size) return null;
  if (BigInt(offset) !== bin.readBigUInt64BE(256)) return null;
  const algF = bin.subarray(72, 104);
  const z = algF.indexOf(0);
  const alg = algF.subarray(0, z < 0 ? 32 : z).toString('latin1');
  if (!isHashAlg(alg)) return null;
  const full = Buffer.alloc(hdrSize);
  await io.read(full, offset);
  const want = Buffer.from(full.subarray(448, 448 + 64));
  full.fill(0, 448, 448 + 64);
  const got = crypto.createHash(alg).update(full).digest();
  if (!got.equals(want.subarray(0, got.length))) return null;
  const area = full.subarray(BIN_SIZE);
  const end = area.indexOf(0);
  if (end < 0) return null;
  let json: unknown;
  try { json = JSON.parse(area.subarray(0, end).toString('utf8')); } catch { return null; }
  return { seqid: bin.readBigUInt64BE(16), hdrSize, json, offset };
}

type Obj = Record<string, unknown>;
function obj(v: unknown, what: string): Obj {
  if (!v || typeof v !== 'object' || Array.isArray(v)) throw bad(`${what} is not an object`);
  return v as Obj;
}
function str(o: Obj, k: string, what: string): string {
  const v = o[k];
  if (typeof v !== 'string') throw bad(`${what}.${k} is missing`);
  return v;
}
function num(o: Obj, k: string, what: string, max = Number.MAX_SAFE_INTEGER): number {
  const v = o[k];
  const n = typeof v === 'string' && /^\d+$/.test(v) ? Number(v) : typeof v === 'number' ? v : NaN;
  if (!Number.isSafeInteger(n) || n < 0 || n > max) throw bad(`${what}.${k} is invalid`);
  return n;
}
function b64(o: Obj, k: string, what: string): Buffer {
  const s = str(o, k, what);
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(s) || s.length > 1024) throw bad(`${what}.${k} is not base64`);
  return Buffer.from(s, 'base64');
}
function encSpec(enc: string, what: string): SectorCipherSpec {
  const i = enc.indexOf('-');
  if (i < 0) throw new ImgError('unsupported', `LUKS2: ${what} encryption '${enc}' is not supported`);
  return parseCipherSpec(enc.slice(0, i), enc.slice(i + 1));
}
function checkKey(spec: SectorCipherSpec, len: number, what: string): void {
  const k = spec.mode === 'xts' ? len / 2 : len;
  if (!Number.isInteger(k) || !validKeyLen(spec.alg, k)) throw bad(`${what}: key size ${len} does not fit the cipher`);
}

export async function openLuks2(io: HeaderIO, pass: Buffer): Promise<UnlockedVolume> {
  const primary = await readHeaderAt(io, 0, MAGIC1);
  let secondary: BinHeader | null = null;
  if (primary) secondary = await readHeaderAt(io, primary.hdrSize, MAGIC2);
  else {
    for (const off of HDR_SIZES) {
      secondary = await readHeaderAt(io, off, MAGIC2);
      if (secondary) break;
    }
  }
  let hd = primary;
  if (secondary && (!hd || secondary.seqid > hd.seqid)) hd = secondary;
  if (!hd) throw bad('no valid header copy (checksum mismatch or corrupt)');
  const j = obj(hd.json, 'metadata');
  const config = obj(j.config, 'config');
  if (config.requirements !== undefined) {
    const req = obj(config.requirements, 'config.requirements');
    if (Array.isArray(req.mandatory) && req.mandatory.length) {
      throw new ImgError('unsupported', `LUKS2: unsupported requirements: ${req.mandatory.map(String).join(', ')}`);
    }
  }
  const keyslots = obj(j.keyslots, 'keyslots');
  const segments = obj(j.segments, 'segments');
  const digests = obj(j.digests, 'digests');
  // the (one) crypt segment
  const segIds = Object.keys(segments);
  if (segIds.length !== 1) throw new ImgError('unsupported', `LUKS2: ${segIds.length} segments (reencryption in progress?) are not supported`);
  const seg = obj(segments[segIds[0]], 'segment');
  if (str(seg, 'type', 'segment') !== 'crypt') throw new ImgError('unsupported', `LUKS2: segment type '${String(seg.type)}' is not supported`);
  const segOffset = num(seg, 'offset', 'segment');
  const sizeStr = str(seg, 'size', 'segment');
  const segSize = sizeStr === 'dynamic' ? null : num(seg, 'size', 'segment');
  const sectorSize = num(seg, 'sector_size', 'segment', 4096);
  if (![512, 1024, 2048, 4096].includes(sectorSize)) throw bad(`sector size ${sectorSize} is invalid`);
  const ivTweak = num(seg, 'iv_tweak', 'segment');
  if (ivTweak % (sectorSize / 512)) throw new ImgError('unsupported', 'LUKS2: iv_tweak is not a whole number of sectors');
  if (segOffset % 512 || segOffset > io.size) throw bad(`segment offset ${segOffset} is invalid`);
  if (segOffset < 2 * hd.hdrSize) throw bad('segment overlaps the metadata');
  if (segSize !== null && (segSize % sectorSize || segOffset + segSize > io.size)) throw bad('segment size is invalid');
  const segSpec = encSpec(str(seg, 'encryption', 'segment'), 'segment');

  const tried: string[] = [];
  for (const [did, dv] of Object.entries(digests)) {
    const d = obj(dv, 'digest');
    if (str(d, 'type', 'digest') !== 'pbkdf2') throw new ImgError('unsupported', `LUKS2: digest type '${String(d.type)}' is not supported`);
    const dsegs = Array.isArray(d.segments) ? d.segments.map(String) : [];
    if (!dsegs.includes(segIds[0])) continue;
    const dhash = str(d, 'hash', 'digest');
    if (!isHashAlg(dhash)) throw new ImgError('unsupported', `LUKS2: digest hash '${dhash}' is not supported`);
    const diter = num(d, 'iterations', 'digest', MAX_ITERATIONS);
    const dsalt = b64(d, 'salt', 'digest');
    const digest = b64(d, 'digest', 'digest');
    if (diter < 1 || digest.length < 16) throw bad(`digest ${did} is invalid`);
    const slotIds = Array.isArray(d.keyslots) ? d.keyslots.map(String) : [];
    for (const sid of slotIds) {
      if (tried.includes(sid) || keyslots[sid] === undefined) continue;
      tried.push(sid);
      const vk = await unlockSlot(io, obj(keyslots[sid], `keyslot ${sid}`), sid, pass, hd.hdrSize * 2, segOffset);
      if (!vk) continue;
      const check = await pbkdf2(dhash, vk, dsalt, diter, digest.length);
      if (!crypto.timingSafeEqual(check, digest)) continue;
      checkKey(segSpec, vk.length, 'segment');
      const info: Record<string, unknown> = {
        'cipher-alg': `${segSpec.alg}-${(segSpec.mode === 'xts' ? vk.length / 2 : vk.length) * 8}`,
        'cipher-mode': segSpec.mode,
        'ivgen-alg': segSpec.ivgen ?? 'plain64',
        'hash-alg': dhash,
        'payload-offset': segOffset,
        'master-key-iters': diter,
        'sector-size': sectorSize,
        version: 2,
      };
      return {
        version: 2, cipher: new SectorCipher(segSpec, vk, sectorSize), payloadOffset: segOffset, payloadSize: segSize,
        sectorSize, ivOffset: ivTweak / (sectorSize / 512), info, masterKey: vk,
      };
    }
  }
  throw new ImgError('crypto', 'Invalid password, cannot unlock any keyslot');
}

async function unlockSlot(io: HeaderIO, ks: Obj, sid: string, pass: Buffer, minOffset: number, maxEnd: number): Promise<Buffer | null> {
  const what = `keyslot ${sid}`;
  if (str(ks, 'type', what) !== 'luks2') return null;
  const keySize = num(ks, 'key_size', what, MAX_KEY);
  const af = obj(ks.af, `${what}.af`);
  if (str(af, 'type', `${what}.af`) !== 'luks1') throw new ImgError('unsupported', `LUKS2: ${what}: af type '${String(af.type)}' is not supported`);
  const stripes = num(af, 'stripes', `${what}.af`, MAX_STRIPES);
  const afHash = str(af, 'hash', `${what}.af`);
  if (!isHashAlg(afHash) || stripes < 1) throw new ImgError('unsupported', `LUKS2: ${what}: af hash '${afHash}' is not supported`);
  const area = obj(ks.area, `${what}.area`);
  if (str(area, 'type', `${what}.area`) !== 'raw') throw new ImgError('unsupported', `LUKS2: ${what}: area type '${String(area.type)}' is not supported`);
  const aOff = num(area, 'offset', `${what}.area`);
  const aSize = num(area, 'size', `${what}.area`);
  const aKey = num(area, 'key_size', `${what}.area`, MAX_KEY);
  const aSpec = encSpec(str(area, 'encryption', `${what}.area`), `${what} area`);
  checkKey(aSpec, aKey, `${what}.area`);
  const matLen = Math.ceil((keySize * stripes) / 512) * 512;
  if (keySize < 1 || aOff % 512 || aOff < minOffset || matLen > aSize || aOff + matLen > io.size || aOff + matLen > maxEnd) {
    throw bad(`${what}: key material area is invalid`);
  }
  const kdf = obj(ks.kdf, `${what}.kdf`);
  const type = str(kdf, 'type', `${what}.kdf`);
  const salt = b64(kdf, 'salt', `${what}.kdf`);
  let derived: Buffer;
  if (type === 'pbkdf2') {
    const h = str(kdf, 'hash', `${what}.kdf`);
    if (!isHashAlg(h)) throw new ImgError('unsupported', `LUKS2: ${what}: hash '${h}' is not supported`);
    const it = num(kdf, 'iterations', `${what}.kdf`, MAX_ITERATIONS);
    if (it < 1) throw bad(`${what}: iterations invalid`);
    derived = await pbkdf2(h as HashAlg, pass, salt, it, aKey);
  } else if (type === 'argon2i' || type === 'argon2id') {
    const time = num(kdf, 'time', `${what}.kdf`, MAX_ARGON_TIME);
    const memory = num(kdf, 'memory', `${what}.kdf`, MAX_ARGON_MEMORY_KIB);
    const cpus = num(kdf, 'cpus', `${what}.kdf`, 16);
    if (time < 1 || memory < 8 * cpus || cpus < 1) throw bad(`${what}: argon2 parameters are invalid`);
    derived = await argon2(type, pass, salt, time, memory, cpus, aKey);
  } else {
    throw new ImgError('unsupported', `LUKS2: ${what}: kdf '${type}' is not supported`);
  }
  const mat = Buffer.alloc(matLen);
  await io.read(mat, aOff);
  new SectorCipher(aSpec, derived, 512).decrypt(mat, 0);
  return afMerge(mat, keySize, stripes, afHash as HashAlg);
}
