// qcow2 encryption glue (issue 6): LUKS (crypt_method 2, the LUKS header in clusters named by
// the full-disk-encryption header extension 0x0537be77) and legacy AES-CBC (crypt_method 1,
// key = passphrase zero-padded to 16 bytes, plain64 IVs). Sector IVs follow qemu: for LUKS
// the host offset of the data (qemu's crypt_physical_offset), for AES the guest offset.
import { ImgError } from '../../core/errors';
import type { OptionTree } from '../../core/options';
import { OptionReader } from '../../core/options';
import type { SecretStore } from '../../core/secrets';
import type { BlockNode, HostCrypt } from '../../core/node';
import { openLuks, readLuksHeaderInfo, secretHint } from '../../crypto/luks';
import { createLuks1, parseCreateOptions } from '../../crypto/luks1';
import { hostCrypt, SectorCipher } from '../../crypto/modes';
import { legacyAesCipher } from '../../crypto/legacy';
import { EXT_CRYPTO, Qcow2Header } from './header';

export const CRYPT_AES = 1;
export const CRYPT_LUKS = 2;
const SECTOR = 512;

export interface QcowCrypto {
  /** decrypts buf (whole 512-byte sectors) read from host offset `host`, guest offset `guest` */
  decrypt(buf: Uint8Array, host: number, guest: number): void;
  encrypt(buf: Uint8Array, host: number, guest: number): void;
  /** qemu-img info's "encrypt" object */
  info: Record<string, unknown>;
  /** the cipher for the native data path, when it can run it (LUKS: IVs from host offsets) */
  hostCrypt?: HostCrypt;
}

class SectorCrypto implements QcowCrypto {
  hostCrypt?: HostCrypt;
  constructor(private c: SectorCipher, private physical: boolean, readonly info: Record<string, unknown>, key?: Buffer) {
    // legacy AES numbers sectors by guest offset, which a host mapping cannot express
    if (physical && key) this.hostCrypt = hostCrypt(c.spec, Buffer.from(key), SECTOR, 0) ?? undefined;
  }
  private sector(host: number, guest: number): number {
    const o = this.physical ? host : guest;
    if (o % SECTOR) throw new ImgError('io', 'qcow2: encrypted I/O is not sector aligned');
    return o / SECTOR;
  }
  decrypt(buf: Uint8Array, host: number, guest: number): void { this.c.decrypt(buf, this.sector(host, guest)); }
  encrypt(buf: Uint8Array, host: number, guest: number): void { this.c.encrypt(buf, this.sector(host, guest)); }
}

/** An encrypted image opened for its header only (info without a secret): no data is readable. */
class LockedCrypto implements QcowCrypto {
  constructor(private hint: string, readonly info: Record<string, unknown>) {}
  decrypt(): void { throw new ImgError('crypto', this.hint); }
  encrypt(): void { throw new ImgError('crypto', this.hint); }
}

/** the full-disk-encryption header extension: offset and length of the LUKS header */
export function cryptoExtension(h: Qcow2Header): { offset: number; length: number } | null {
  const e = h.otherExtensions.find((x) => x.type === EXT_CRYPTO);
  if (!e) return null;
  if (e.data.length !== 16) throw new ImgError('image', 'qcow2: Invalid crypto header extension size');
  const offset = e.data.readBigUInt64BE(0);
  const length = e.data.readBigUInt64BE(8);
  if (offset > BigInt(Number.MAX_SAFE_INTEGER) || length > BigInt(64 << 20)) throw new ImgError('image', 'qcow2: crypto header extension is out of range');
  return { offset: Number(offset), length: Number(length) };
}

function readEncryptOptions(options: OptionTree): { format?: string; secret?: string } {
  const e = options.encrypt;
  if (e === undefined) return {};
  if (typeof e === 'string') throw new ImgError('usage', "qcow2: option 'encrypt' expects encrypt.key-secret=... and encrypt.format=...");
  const r = new OptionReader(e, 'qcow2 encrypt');
  const format = r.str('format');
  const secret = r.str('key-secret');
  r.finish();
  return { format, secret };
}

/** opens the encryption layer of an image (null when it is not encrypted) */
export async function openQcow2Crypto(file: BlockNode, h: Qcow2Header, options: OptionTree, secrets: SecretStore, headerOnly = false): Promise<QcowCrypto | null> {
  const eo = readEncryptOptions(options);
  if (h.cryptMethod === 0) {
    if (eo.format !== undefined || eo.secret !== undefined) throw new ImgError('usage', 'qcow2: encryption options given for an image that is not encrypted');
    return null;
  }
  const fmt = h.cryptMethod === CRYPT_AES ? 'aes' : 'luks';
  if (eo.format !== undefined && eo.format !== fmt) throw new ImgError('usage', `qcow2: encrypt.format=${eo.format} does not match the image's ${fmt} encryption`);
  const hint = secretHint(`${file.filename}: encrypted qcow2 image`, 'encrypt.key-secret');
  if (eo.secret === undefined && headerOnly) {
    // qemu-img info shows the LUKS header without unlocking it
    if (h.cryptMethod === CRYPT_AES) return new LockedCrypto(hint, { format: 'aes' });
    const ext = cryptoExtension(h);
    if (ext && ext.offset + ext.length <= file.size) {
      const hdr = await readLuksHeaderInfo({
        size: ext.length,
        read: async (b, o) => {
          if (o + b.length > ext.length) throw new ImgError('image', 'qcow2: LUKS header read beyond the crypto header extension');
          await file.read(b, ext.offset + o);
        },
      });
      if (hdr) {
        const info: Record<string, unknown> = { format: 'luks', ...hdr.info };
        delete info['payload-offset'];
        info['payload-offset'] = hdr.payloadOffset;
        return new LockedCrypto(hint, info);
      }
    }
  }
  if (eo.secret === undefined) throw new ImgError('crypto', hint);
  if (!secrets.has(eo.secret)) throw new ImgError('crypto', `No secret with id '${eo.secret}' (pass it with --object secret,id=${eo.secret},file=PASSFILE)`);
  const pass = secrets.get(eo.secret);
  try {
    if (h.cryptMethod === CRYPT_AES) {
      if (cryptoExtension(h)) throw new ImgError('image', 'qcow2: crypto header extension with AES encryption');
      return new SectorCrypto(legacyAesCipher(pass), false, { format: 'aes' });
    }
    const ext = cryptoExtension(h);
    if (!ext) throw new ImgError('image', 'qcow2: LUKS encryption without the crypto header extension');
    const cs = 2 ** h.clusterBits;
    if (ext.offset % cs) throw new ImgError('image', 'qcow2: crypto header offset is not cluster aligned');
    if (ext.offset + ext.length > file.size) throw new ImgError('image', 'qcow2: crypto header is beyond the end of the file');
    const vol = await openLuks({
      size: ext.length,
      read: async (b, o) => {
        if (o + b.length > ext.length) throw new ImgError('image', 'qcow2: LUKS header read beyond the crypto header extension');
        await file.read(b, ext.offset + o);
      },
    }, pass, false);
    if (vol.sectorSize !== SECTOR) throw new ImgError('unsupported', `qcow2: LUKS sector size ${vol.sectorSize} is not supported`);
    const info: Record<string, unknown> = { format: 'luks', ...vol.info };
    delete info['payload-offset'];
    info['payload-offset'] = vol.payloadOffset;
    const c = new SectorCrypto(vol.cipher, true, info, vol.masterKey);
    vol.masterKey.fill(0);
    return c;
  } finally {
    pass.fill(0);
  }
}

/** create options under `encrypt.` (and the legacy `encryption=on`) */
export interface Qcow2EncryptCreate {
  format: 'luks' | 'aes';
  pass: Buffer;
  luks: ReturnType<typeof parseCreateOptions>;
}

export function parseEncryptCreate(encrypt: OptionTree | string | undefined, encryption: boolean, secrets: SecretStore): Qcow2EncryptCreate | null {
  if (encrypt === undefined && !encryption) return null;
  if (typeof encrypt === 'string') throw new ImgError('usage', "qcow2: option 'encrypt' expects encrypt.format=... and encrypt.key-secret=...");
  const r = new OptionReader(encrypt ?? {}, 'qcow2 encrypt');
  const format = r.choice('format', ['luks', 'aes'] as const, encryption ? 'aes' : 'luks');
  const id = r.str('key-secret');
  const luks = parseCreateOptions((k) => (format === 'luks' ? r.str(k) : undefined));
  r.finish();
  if (encryption && format !== 'aes') throw new ImgError('usage', 'qcow2: encryption=on and encrypt.format=luks conflict');
  if (id === undefined) throw new ImgError('crypto', secretHint(`qcow2: creating an encrypted image`, 'encrypt.key-secret'));
  if (!secrets.has(id)) throw new ImgError('crypto', `No secret with id '${id}' (pass it with --object secret,id=${id},file=PASSFILE)`);
  if (format === 'aes') process.stderr.write('imgmount: warning: qcow2 AES encryption (encrypt.format=aes) is deprecated and insecure; use encrypt.format=luks\n');
  return { format, pass: secrets.get(id), luks };
}

/** builds the LUKS header area for a new image (to be stored in clusters) */
export async function buildLuksArea(e: Qcow2EncryptCreate): Promise<Buffer> {
  const { area } = await createLuks1(e.luks, e.pass);
  return area;
}

export function cryptoExtData(offset: number, length: number): Buffer {
  const b = Buffer.alloc(16);
  b.writeBigUInt64BE(BigInt(offset), 0);
  b.writeBigUInt64BE(BigInt(length), 8);
  return b;
}
