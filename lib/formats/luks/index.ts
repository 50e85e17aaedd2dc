// luks: a LUKS1/LUKS2 volume in a file; the guest sees the decrypted payload (qemu's
// block/crypto.c). Payload ranges are offered to the native data path with their cipher
// (HostCrypt) when it is one OpenSSL runs; otherwise every byte passes through here.
import { ImgError } from '../../core/errors';
import type { BlockNode, CreateContext, Extent, FormatDriver, HostCrypt, OpenContext, Preallocation, WriteFlags } from '../../core/node';
import { OptionReader } from '../../core/options';
import { createFile, FileNode, withFileRw } from '../../protocols/file';
import { isLuks, openLuks, readLuksHeaderInfo, secretHint } from '../../crypto/luks';
import { createLuks1, parseCreateOptions, UnlockedVolume } from '../../crypto/luks1';
import { hostCrypt, SectorCipher } from '../../crypto/modes';

/** requests are cut into chunks of this size so the crypto temporaries stay bounded */
const CHUNK = 4 << 20;

class LuksNode implements BlockNode {
  readonly driver = 'luks';
  readonly backing = null;
  readonly align: number;
  mapInvalidator = null;
  private cipher: SectorCipher;
  private hostCrypt: HostCrypt | null;
  constructor(readonly file: BlockNode, private vol: UnlockedVolume, readonly readOnly: boolean) {
    this.align = Math.max(vol.sectorSize, file.align);
    this.cipher = vol.cipher;
    // guest sector s is host sector payloadOffset/ss + s and has IV ivOffset + s
    this.hostCrypt = hostCrypt(vol.cipher.spec, vol.masterKey, vol.sectorSize, vol.payloadOffset - vol.ivOffset * vol.sectorSize);
  }
  get filename(): string { return this.file.filename; }
  get size(): number {
    const s = this.vol.payloadSize ?? Math.max(0, this.file.size - this.vol.payloadOffset);
    return Math.floor(s / this.vol.sectorSize) * this.vol.sectorSize;
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    const ss = this.vol.sectorSize;
    for (let p = 0; p < buf.length; p += CHUNK) {
      const part = buf.subarray(p, Math.min(buf.length, p + CHUNK));
      await this.file.read(part, this.vol.payloadOffset + offset + p);
      this.cipher.decrypt(part, this.vol.ivOffset + (offset + p) / ss);
    }
  }

  async write(buf: Uint8Array, offset: number, flags?: WriteFlags): Promise<void> {
    if (this.readOnly) throw new ImgError('readonly', 'luks: image is read-only');
    const ss = this.vol.sectorSize;
    for (let p = 0; p < buf.length; p += CHUNK) {
      const part = Buffer.from(buf.subarray(p, Math.min(buf.length, p + CHUNK)));
      this.cipher.encrypt(part, this.vol.ivOffset + (offset + p) / ss);
      await this.file.write!(part, this.vol.payloadOffset + offset + p, flags?.fua ? { fua: true } : undefined);
    }
  }

  async flush(): Promise<void> { if (this.file.flush) await this.file.flush(); }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    // every sector is ciphertext: data (a hole in the file decrypts to noise, not zeros)
    if (!this.hostCrypt) return { offset, length, state: 'data' };
    const fe = await this.file.blockStatus(this.vol.payloadOffset + offset, length);
    const len = Math.max(1, Math.min(length, fe.length));
    if (!fe.host || fe.host.crypt) return { offset, length: len, state: 'data' };
    const host = { ...fe.host, writable: fe.host.writable && !this.readOnly, crypt: this.hostCrypt };
    return { offset, length: len, state: 'data', host };
  }

  async truncate(size: number, prealloc?: Preallocation): Promise<void> {
    if (this.vol.payloadSize !== null) throw new ImgError('unsupported', 'luks: cannot resize a LUKS2 segment with a fixed size');
    if (size % this.vol.sectorSize) throw new ImgError('usage', `luks: size must be a multiple of ${this.vol.sectorSize}`);
    if (!this.file.truncate) throw new ImgError('unsupported', 'luks: the protocol cannot resize');
    await this.file.truncate(this.vol.payloadOffset + size, prealloc);
  }

  async allocatedSize(): Promise<number> { return this.file.allocatedSize ? this.file.allocatedSize() : this.file.size; }
  async infoExtra(): Promise<Record<string, unknown>> { return { encrypted: true }; }
  async formatSpecific(): Promise<{ type: string; data: Record<string, unknown> }> {
    return { type: 'luks', data: { ...this.vol.info } };
  }
  async close(): Promise<void> {
    this.vol.masterKey.fill(0);
    await this.file.close();
  }
}

/** A LUKS image opened for its header only (info without a secret): no data is readable. */
class LockedLuksNode implements BlockNode {
  readonly driver = 'luks';
  readonly backing = null;
  readonly readOnly = true;
  readonly align = 512;
  mapInvalidator = null;
  constructor(readonly file: BlockNode, private payloadOffset: number, private info: Record<string, unknown>) {}
  get filename(): string { return this.file.filename; }
  get size(): number { return Math.floor(Math.max(0, this.file.size - this.payloadOffset) / 512) * 512; }
  async read(): Promise<void> {
    throw new ImgError('crypto', secretHint(`${this.file.filename}: LUKS image`, 'key-secret'));
  }
  async blockStatus(offset: number, length: number): Promise<Extent> { return { offset, length, state: 'data' }; }
  async allocatedSize(): Promise<number> { return this.file.allocatedSize ? this.file.allocatedSize() : this.file.size; }
  async infoExtra(): Promise<Record<string, unknown>> { return { encrypted: true }; }
  async formatSpecific(): Promise<{ type: string; data: Record<string, unknown> }> { return { type: 'luks', data: { ...this.info } }; }
  async close(): Promise<void> { await this.file.close(); }
}

function passphrase(ctx: { secrets: OpenContext['secrets'] }, id: string | undefined, what: string, opt: string): Buffer {
  if (id === undefined) throw new ImgError('crypto', secretHint(what, opt));
  if (!ctx.secrets.has(id)) throw new ImgError('crypto', `No secret with id '${id}' (pass it with --object secret,id=${id},file=PASSFILE)`);
  return ctx.secrets.get(id);
}

export const LUKS_CREATE_OPTIONS = ['key-secret', 'cipher-alg', 'cipher-mode', 'ivgen-alg', 'ivgen-hash-alg', 'hash-alg', 'iter-time'];

export const luksDriver: FormatDriver = {
  name: 'luks',
  probe: (h) => (isLuks(h) ? 100 : 0),
  createOptions: ['size', 'preallocation', ...LUKS_CREATE_OPTIONS],
  async open(file: BlockNode, ctx: OpenContext): Promise<BlockNode> {
    const r = new OptionReader(ctx.options, 'luks');
    const id = r.str('key-secret');
    r.finish();
    if (id === undefined && ctx.headerOnly) {
      const hdr = await readLuksHeaderInfo({ size: file.size, read: (b, o) => file.read(b, o) });
      if (hdr) return new LockedLuksNode(file, hdr.payloadOffset, hdr.info);
    }
    const pass = passphrase(ctx, id, `${file.filename}: LUKS image`, 'key-secret');
    try {
      const vol = await openLuks({ size: file.size, read: (b, o) => file.read(b, o) }, pass, true);
      return new LuksNode(file, vol, ctx.readOnly);
    } finally {
      pass.fill(0);
    }
  },
  async create(ctx: CreateContext): Promise<void> {
    const r = new OptionReader(ctx.options, 'luks');
    r.markUsed('size');
    const prealloc = r.choice('preallocation', ['off', 'metadata', 'falloc', 'full'] as const, 'off');
    const id = r.str('key-secret');
    const o = parseCreateOptions((k) => r.str(k));
    r.finish();
    if (ctx.size === null) throw new ImgError('usage', 'luks: image size required');
    if (ctx.size % 512) throw new ImgError('usage', 'luks: image size must be a multiple of 512');
    const pass = passphrase(ctx, id, 'luks: creating an image', 'key-secret');
    const { area, payloadOffset } = await createLuks1(o, pass);
    pass.fill(0);
    const size = ctx.size;
    await createFile(ctx.filename, 0, 'off');
    await withFileRw(ctx.filename, async (f) => {
      await f.write(area, 0);
      await f.truncate(payloadOffset + size, prealloc === 'metadata' ? 'off' : prealloc);
    });
  },
};
