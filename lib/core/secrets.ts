// `--object secret,id=ID,data=...|file=...[,format=raw|base64]` as qemu parses it. Secret
// values live only here; nothing prints them and they never go into child argv.
import crypto from 'node:crypto';
import fs from 'node:fs';
import { ImgError } from './errors';
import { parseOptionString } from './options';

interface SecretDef {
  id: string;
  data?: string;
  file?: string;
  format: 'raw' | 'base64';
  keyid?: string;
  iv?: string;
}

export class SecretStore {
  private defs = new Map<string, SecretDef>();

  /** parses one --object argument; only the `secret` type is known for now */
  addObject(spec: string): void {
    const t = parseOptionString(spec, 'qom-type');
    const type = t['qom-type'];
    if (type !== 'secret') {
      throw new ImgError('usage', `--object: unsupported object type '${typeof type === 'string' ? type : ''}' (only secret is supported)`);
    }
    const known = new Set(['qom-type', 'id', 'data', 'file', 'format', 'keyid', 'iv']);
    for (const k of Object.keys(t)) {
      if (!known.has(k) || typeof t[k] !== 'string') throw new ImgError('usage', `--object secret: unknown option '${k}'`);
    }
    const id = t.id as string | undefined;
    if (!id) throw new ImgError('usage', '--object secret: missing id');
    const data = t.data as string | undefined;
    const file = t.file as string | undefined;
    if ((data === undefined) === (file === undefined)) {
      throw new ImgError('usage', `--object secret ${id}: exactly one of data= or file= is required`);
    }
    const format = (t.format as string | undefined) ?? 'raw';
    if (format !== 'raw' && format !== 'base64') throw new ImgError('usage', `--object secret ${id}: format must be raw or base64`);
    if (this.defs.has(id)) throw new ImgError('usage', `--object secret: duplicate id '${id}'`);
    this.defs.set(id, { id, data, file, format, keyid: t.keyid as string | undefined, iv: t.iv as string | undefined });
  }

  has(id: string): boolean { return this.defs.has(id); }
  ids(): string[] { return [...this.defs.keys()]; }

  /** the secret's bytes (encrypted secrets, keyid=, decrypted) */
  get(id: string): Buffer { return this.getAt(id, 0); }

  private getAt(id: string, depth: number): Buffer {
    const d = this.defs.get(id);
    if (!d) throw new ImgError('crypto', `secret '${id}' not found (pass it with --object secret,id=${id},file=...)`);
    let raw: Buffer;
    if (d.file !== undefined) {
      try { raw = fs.readFileSync(d.file); } catch (e) {
        throw new ImgError('usage', `secret '${id}': cannot read ${d.file}: ${(e as NodeJS.ErrnoException).code ?? 'error'}`);
      }
    } else raw = Buffer.from(d.data as string, 'utf8');
    if (d.format === 'base64') {
      const text = raw.toString('utf8').trim();
      if (!/^[A-Za-z0-9+/]*={0,2}$/.test(text)) throw new ImgError('usage', `secret '${id}': invalid base64`);
      raw = Buffer.from(text, 'base64');
    }
    if (d.keyid !== undefined) raw = this.decrypt(id, d, raw, depth);
    return raw;
  }

  /** qemu's encrypted secret: AES-256-CBC with the 32-byte key of secret `keyid` and the
   *  base64 iv=, PKCS#7 padding (after the format= decoding of the data) */
  private decrypt(id: string, d: SecretDef, data: Buffer, depth: number): Buffer {
    const keyid = d.keyid as string;
    if (keyid === id || depth > 8) throw new ImgError('usage', `secret '${id}': keyid '${keyid}' refers back to itself`);
    if (!this.defs.has(keyid)) throw new ImgError('crypto', `secret '${id}': no master key secret with id '${keyid}'`);
    if (d.iv === undefined) throw new ImgError('usage', `secret '${id}': encrypted secrets (keyid=) need iv=`);
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(d.iv)) throw new ImgError('usage', `secret '${id}': iv= is not base64`);
    const iv = Buffer.from(d.iv, 'base64');
    if (iv.length !== 16) throw new ImgError('usage', `secret '${id}': iv= must be 16 bytes, got ${iv.length}`);
    const key = this.getAt(keyid, depth + 1);
    try {
      if (key.length !== 32) throw new ImgError('crypto', `secret '${id}': master key '${keyid}' must be 32 bytes, got ${key.length}`);
      if (data.length === 0 || data.length % 16) throw new ImgError('crypto', `secret '${id}': ciphertext length ${data.length} is not a multiple of 16`);
      const dc = crypto.createDecipheriv('aes-256-cbc', key, iv).setAutoPadding(false);
      const plain = Buffer.concat([dc.update(data), dc.final()]);
      const pad = plain[plain.length - 1];
      if (pad < 1 || pad > 16) throw new ImgError('crypto', `secret '${id}': cannot decrypt with master key '${keyid}' (bad padding)`);
      const out = Buffer.from(plain.subarray(0, plain.length - pad));
      plain.fill(0);
      return out;
    } finally {
      key.fill(0);
    }
  }

  /** serialisable form handed to the background server over a pipe, never argv */
  toJSON(): SecretDef[] { return [...this.defs.values()]; }
  static fromJSON(defs: SecretDef[]): SecretStore {
    const s = new SecretStore();
    for (const d of defs) s.defs.set(d.id, { ...d });
    return s;
  }
}
