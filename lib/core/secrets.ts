// `--object secret,id=ID,data=...|file=...[,format=raw|base64]` as qemu parses it. Secret
// values live only here; nothing prints them and they never go into child argv.
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

  /** the secret's bytes; encrypted secrets (keyid=) are decoded by the crypto layer's hook */
  get(id: string): Buffer {
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
    if (d.keyid !== undefined) {
      if (!SecretStore.decryptHook) throw new ImgError('crypto', `secret '${id}': encrypted secrets are not supported yet`);
      raw = SecretStore.decryptHook(this, d.keyid, d.iv, raw);
    }
    return raw;
  }

  /** serialisable form handed to the background server over a pipe, never argv */
  toJSON(): SecretDef[] { return [...this.defs.values()]; }
  static fromJSON(defs: SecretDef[]): SecretStore {
    const s = new SecretStore();
    for (const d of defs) s.defs.set(d.id, { ...d });
    return s;
  }

  static decryptHook: ((store: SecretStore, keyid: string, iv: string | undefined, data: Buffer) => Buffer) | null = null;
}
