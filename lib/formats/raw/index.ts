// raw: the guest sees the file's bytes (optionally a window: offset=, size=).
import { ImgError } from '../../core/errors';
import type { BlockNode, CreateContext, Extent, FormatDriver, OpenContext, Preallocation, WriteFlags, ZeroFlags } from '../../core/node';
import { OptionReader } from '../../core/options';
import { createFile } from '../../protocols/file';

const PROBE_SECTOR = 512;
/** a format recognised by its tail (fixed VHD, dmg) keeps its signature in the last 512 bytes */
const TAIL_GUARD = 512;

class RawNode implements BlockNode {
  readonly driver = 'raw';
  readonly readOnly: boolean;
  readonly align: number;
  readonly backing = null;
  mapInvalidator = null;
  constructor(readonly file: BlockNode, private offset: number, private fixedSize: number | null, readOnly: boolean,
    private probed: boolean) {
    this.readOnly = readOnly;
    this.align = file.align;
  }

  get filename(): string { return this.file.filename; }
  get size(): number {
    return this.fixedSize ?? Math.max(0, this.file.size - this.offset);
  }

  read(buf: Uint8Array, offset: number): Promise<void> { return this.file.read(buf, offset + this.offset); }
  async write(buf: Uint8Array, offset: number, flags?: WriteFlags): Promise<void> {
    if (this.probed && offset < PROBE_SECTOR) await this.checkProbeSafe(buf, offset);
    if (this.probed && offset + buf.length > this.size - TAIL_GUARD) await this.checkTailSafe(buf, offset);
    return this.file.write!(buf, offset + this.offset, flags);
  }

  // As qemu: an image that was probed as raw must not be turned into something that would be
  // probed as another format next time (a guest could otherwise make the host open its
  // backing files).
  private async checkProbeSafe(buf: Uint8Array, offset: number): Promise<void> {
    const sector = Buffer.alloc(Math.min(PROBE_SECTOR, this.size));
    await this.file.read(sector, this.offset);
    sector.set(buf.subarray(0, Math.max(0, sector.length - offset)), offset);
    const { probeFormat } = await import('../index');
    const fmt = probeFormat(sector, this.filename);
    if (fmt.name !== 'raw') {
      throw new ImgError('permission', `write to sector 0 refused: it would make the probed raw image look like ${fmt.name} (pass -f raw)`);
    }
  }
  async writeZeroes(offset: number, length: number, flags?: ZeroFlags): Promise<void> {
    if (this.file.writeZeroes) return this.file.writeZeroes(offset + this.offset, length, flags);
    throw new ImgError('unsupported', 'write zeroes not supported');
  }
  async discard(offset: number, length: number): Promise<void> {
    if (this.file.discard) await this.file.discard(offset + this.offset, length);
  }
  // the same for the end of the file, where a fixed VHD footer or a dmg trailer would sit
  private async checkTailSafe(buf: Uint8Array, offset: number): Promise<void> {
    const start = Math.max(0, this.size - TAIL_GUARD);
    const tail = Buffer.alloc(this.size - start);
    await this.file.read(tail, this.offset + start);
    const from = Math.max(offset, start);
    tail.set(buf.subarray(from - offset, Math.min(buf.length, this.size - offset)), from - start);
    const { drivers } = await import('../index');
    for (const d of drivers) {
      if (d.probeTail && d.probeTail(tail, this.size) > 0) {
        throw new ImgError('permission', `write to the last sectors refused: it would make the probed raw image look like ${d.name} (pass -f raw)`);
      }
    }
  }

  async flush(): Promise<void> { if (this.file.flush) await this.file.flush(); }
  async blockStatus(offset: number, length: number): Promise<Extent> {
    // sector 0 of a probed image must pass checkProbeSafe: never let the fast path write it
    const headEnd = Math.max(PROBE_SECTOR, this.align);
    const tailStart = Math.max(0, this.size - Math.max(TAIL_GUARD, this.align));
    let guarded = false;
    if (this.probed && !this.readOnly) {
      if (offset < headEnd) { guarded = true; length = Math.min(length, headEnd - offset); }
      else if (offset >= tailStart) guarded = true;
      else length = Math.min(length, tailStart - offset);
    }
    const ext = await this.file.blockStatus(offset + this.offset, length);
    return {
      offset,
      length: Math.min(ext.length, length),
      state: ext.state === 'unallocated' ? 'zero' : ext.state,
      host: ext.host ? { ...ext.host, writable: ext.host.writable && !guarded } : undefined,
    };
  }
  async truncate(size: number, prealloc?: Preallocation): Promise<void> {
    if (this.fixedSize !== null || this.offset) throw new ImgError('unsupported', 'cannot resize a raw image with offset or size options');
    if (!this.file.truncate) throw new ImgError('unsupported', 'the protocol cannot resize');
    await this.file.truncate(size, prealloc);
  }
  async allocatedSize(): Promise<number> { return this.file.allocatedSize ? this.file.allocatedSize() : this.size; }
  async close(): Promise<void> { await this.file.close(); }
}

export const rawDriver: FormatDriver = {
  name: 'raw',
  // raw is what remains when nothing else matched; it is never probed into a format
  probe: () => 1,
  createOptions: ['size', 'preallocation'],
  async open(file: BlockNode, ctx: OpenContext): Promise<BlockNode> {
    const r = new OptionReader(ctx.options, 'raw');
    const offset = r.int('offset', 0);
    const sizeOpt = r.str('size');
    r.finish();
    if (offset > file.size) throw new ImgError('image', `raw: offset ${offset} is beyond the end of the file (${file.size} bytes)`);
    let fixed: number | null = null;
    if (sizeOpt !== undefined) {
      fixed = new OptionReader({ size: sizeOpt }, 'raw').int('size', 0);
      if (offset + fixed > file.size) throw new ImgError('image', `raw: offset+size (${offset + fixed}) is beyond the end of the file (${file.size} bytes)`);
    }
    return new RawNode(file, offset, fixed, ctx.readOnly, ctx.probed);
  },
  async create(ctx: CreateContext): Promise<void> {
    const r = new OptionReader(ctx.options, 'raw');
    const prealloc = r.choice('preallocation', ['off', 'falloc', 'full'] as const, 'off');
    r.markUsed('size');
    r.finish();
    if (ctx.size === null) throw new ImgError('usage', 'raw: image size required');
    await createFile(ctx.filename, ctx.size, prealloc);
  },
};
