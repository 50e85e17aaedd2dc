// The legacy qcow/qcow2 AES encryption (crypt_method 1): AES-128-CBC, the key is the passphrase
// zero-padded (or cut) to 16 bytes, plain64 IVs from the guest sector number. Insecure and
// deprecated in qemu; read and write are supported, creation warns.
import { ImgError } from '../core/errors';
import { OptionReader, OptionTree } from '../core/options';
import type { SecretStore } from '../core/secrets';
import { secretHint } from './luks';
import { SectorCipher } from './modes';

export function legacyAesCipher(pass: Buffer): SectorCipher {
  const key = Buffer.alloc(16);
  pass.copy(key, 0, 0, Math.min(16, pass.length));
  const c = new SectorCipher({ alg: 'aes', mode: 'cbc', ivgen: 'plain64' }, key, 512);
  key.fill(0);
  return c;
}

function secretOf(id: string | undefined, secrets: SecretStore, what: string): Buffer {
  if (id === undefined) throw new ImgError('crypto', secretHint(what, 'encrypt.key-secret'));
  if (!secrets.has(id)) throw new ImgError('crypto', `No secret with id '${id}' (pass it with --object secret,id=${id},file=PASSFILE)`);
  return secrets.get(id);
}

/** opens the AES layer of an image whose header says crypt_method 1 (`encrypt` = the user's
 *  encrypt.* options); for an unencrypted image, encrypt options are refused */
export function openLegacyAes(encrypted: boolean, encrypt: OptionTree | string | undefined, secrets: SecretStore, what: string): SectorCipher | null {
  if (typeof encrypt === 'string') throw new ImgError('usage', `${what}: option 'encrypt' expects encrypt.key-secret=...`);
  const r = new OptionReader(encrypt ?? {}, `${what} encrypt`);
  const format = r.str('format');
  const id = r.str('key-secret');
  r.finish();
  if (!encrypted) {
    if (format !== undefined || id !== undefined) throw new ImgError('usage', `${what}: encryption options given for an image that is not encrypted`);
    return null;
  }
  if (format !== undefined && format !== 'aes') throw new ImgError('usage', `${what}: encrypt.format=${format} does not match the image's aes encryption`);
  const pass = secretOf(id, secrets, `${what}: encrypted image`);
  try { return legacyAesCipher(pass); } finally { pass.fill(0); }
}

/** create options: `encryption=on` or `encrypt.format=aes` with encrypt.key-secret; returns the
 *  passphrase (null: not encrypted) and prints qemu's deprecation warning once */
export function legacyAesCreate(encryption: boolean, encrypt: OptionTree | string | undefined, secrets: SecretStore, what: string): Buffer | null {
  if (typeof encrypt === 'string') throw new ImgError('usage', `${what}: option 'encrypt' expects encrypt.format=aes,encrypt.key-secret=...`);
  if (!encryption && encrypt === undefined) return null;
  const r = new OptionReader(encrypt ?? {}, `${what} encrypt`);
  const format = r.str('format') ?? 'aes';
  const id = r.str('key-secret');
  r.finish();
  if (format !== 'aes') throw new ImgError('usage', `${what}: only encrypt.format=aes is supported`);
  const pass = secretOf(id, secrets, `${what}: creating an encrypted image`);
  process.stderr.write(`imgmount: warning: ${what} AES encryption is deprecated and insecure; use qcow2 with encrypt.format=luks\n`);
  return pass;
}
