// The vmdk block node: a list of extents in guest order, the descriptor (CID), a backing file.
import crypto from 'node:crypto';
import { ImgError } from '../../core/errors';
import { readBacking } from '../../core/io';
import type { BlockNode, Extent, MapInvalidator, WriteFlags, ZeroFlags } from '../../core/node';
import type { FileNode } from '../../protocols/file';
import { replaceCid } from './descriptor';
import { SparseExtent, VmdkExtent } from './extent';
import { Mutex } from '../../core/mutex';


export interface DescLocation {
  /** where the descriptor text lives: embedded in a sparse extent, or the descriptor file */
  file: BlockNode;
  offset: number;
  /** room for the text (embedded); 0 = the whole file is the descriptor */
  room: number;
  text: string;
}

const MERGE_LIMIT = 4096;

export class VmdkNode implements BlockNode {
  readonly driver = 'vmdk';
  readonly align = 1;
  readonly size: number;
  mapInvalidator: MapInvalidator | null = null;
  private lock = new Mutex();
  private cidUpdated = false;
  private cidValid: boolean;
  private closed = false;

  constructor(
    readonly file: BlockNode,
    readonly extents: VmdkExtent[],
    readonly readOnly: boolean,
    public backing: BlockNode | null,
    readonly createType: string,
    public cid: number,
    readonly parentCid: number,
    private desc: DescLocation,
    readonly parentHint: string | null,
    readonly fullBacking: string | null,
  ) {
    let start = 0;
    for (const e of extents) { e.start = start; start += e.size; }
    this.size = start;
    // qemu's vmdk_is_cid_valid: a non-vmdk backing file makes the parent CID invalid
    this.cidValid = true;
    if (backing) {
      const b = backing as Partial<VmdkNode>;
      this.cidValid = backing.driver === 'vmdk' && b.cid === parentCid;
    }
    for (const e of extents) {
      if (e instanceof SparseExtent) {
        e.backingRead = this.backing ? async (buf, rel) => { this.checkCid(); await readBacking(this.backing, buf, e.start + rel); } : null;
      }
    }
  }

  get filename(): string { return this.file.filename; }

  private checkCid(): void {
    if (!this.cidValid) throw new ImgError('image', `vmdk: '${this.filename}': parent CID ${this.parentCid.toString(16)} does not match the backing file's CID`);
  }

  /** index of the extent holding guest byte `off` */
  private find(off: number): VmdkExtent {
    let lo = 0, hi = this.extents.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.extents[mid].start <= off) lo = mid; else hi = mid - 1;
    }
    const e = this.extents[lo];
    if (!e || off < e.start || off >= e.start + e.size) throw new ImgError('range', `vmdk: offset ${off} is outside every extent`);
    return e;
  }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    const e = this.find(offset);
    const rel = offset - e.start;
    const max = Math.min(length, e.size - rel);
    const first = await e.map(rel, max);
    let len = first.length;
    // merge neighbouring grains with the same state (and contiguous host storage)
    for (let i = 0; i < MERGE_LIMIT && len < max; i++) {
      const m = await e.map(rel + len, max - len);
      if (m.state !== first.state || !!m.compressed !== !!first.compressed) break;
      if (first.host !== undefined && m.host !== first.host + len) break;
      if ((first.host === undefined) !== (m.host === undefined)) break;
      len += m.length;
    }
    if (first.state === 'unallocated' && this.backing) this.checkCid();
    const ext: Extent = { offset, length: len, state: first.state };
    if (e.flat && first.host !== undefined) {
      // a flat extent reads as its file: holes there read as zeros (qemu's BDRV_BLOCK_RECURSE)
      const f = await e.file.blockStatus(first.host, len);
      ext.length = Math.max(1, Math.min(len, f.length));
      if (f.state !== 'data') ext.state = 'zero';
    }
    const fnode = e.file as FileNode;
    if (first.host !== undefined && typeof fnode.fd === 'number') {
      ext.host = { fd: fnode.fd, offset: first.host, writable: !this.readOnly && !e.readOnly && !e.compressed, direct: !!fnode.direct };
    }
    return ext;
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const e = this.find(offset + done);
      const rel = offset + done - e.start;
      const n = Math.min(buf.length - done, e.size - rel);
      await e.read(buf.subarray(done, done + n), rel);
      done += n;
    }
  }

  private async touchCid(): Promise<void> {
    if (this.cidUpdated) return;
    await this.lock.lock(async () => {
      if (this.cidUpdated) return;
      this.cidUpdated = true;
      const cid = crypto.randomBytes(4).readUInt32LE(0);
      const text = replaceCid(this.desc.text, cid);
      if (this.desc.file.readOnly || !this.desc.file.write) return;
      const b = Buffer.from(text, 'latin1');
      if (this.desc.room) {
        if (b.length > this.desc.room) return;
        const pad = Buffer.alloc(Math.min(this.desc.room, Math.ceil(b.length / 512) * 512 + 512));
        b.copy(pad);
        await this.desc.file.write(pad.subarray(0, Math.min(pad.length, this.desc.room)), this.desc.offset);
      } else {
        await this.desc.file.write(b, 0);
        if (this.desc.file.truncate && this.desc.file.size !== b.length) await this.desc.file.truncate(b.length);
      }
      this.desc.text = text;
      this.cid = cid;
    });
  }

  async write(buf: Uint8Array, offset: number, _flags?: WriteFlags): Promise<void> {
    if (this.readOnly) throw new ImgError('readonly', 'vmdk: the image is opened read-only');
    await this.touchCid();
    let done = 0;
    while (done < buf.length) {
      const e = this.find(offset + done);
      const rel = offset + done - e.start;
      const n = Math.min(buf.length - done, e.size - rel);
      const sub = buf.subarray(done, done + n);
      if (!(await e.writeInPlace(sub, rel))) {
        const se = e as SparseExtent;
        await this.lock.lock(async () => {
          this.mapInvalidator?.(offset + done, n);
          await se.allocWrite(sub, rel);
        });
      }
      done += n;
    }
  }

  async writeZeroes(offset: number, length: number, flags?: ZeroFlags): Promise<void> {
    if (this.readOnly) throw new ImgError('readonly', 'vmdk: the image is opened read-only');
    let done = 0;
    while (done < length) {
      const e = this.find(offset + done);
      const rel = offset + done - e.start;
      const n = Math.min(length - done, e.size - rel);
      let ok = false;
      if (e instanceof SparseExtent) {
        await this.touchCid();
        ok = await this.lock.lock(async () => {
          this.mapInvalidator?.(offset + done, n);
          return e.zeroGrains(rel, n);
        });
      } else if (e.flat && e.type !== 'ZERO' && e.file.writeZeroes && !e.readOnly) {
        await this.touchCid();
        await e.file.writeZeroes((e as unknown as { offset: number }).offset + rel, n, flags);
        ok = true;
      }
      if (!ok) {
        if (flags?.noFallback) throw new ImgError('unsupported', 'vmdk: efficient zeroing is not possible here');
        const z = Buffer.alloc(Math.min(n, 1 << 20));
        for (let p = 0; p < n; p += z.length) await this.write(z.subarray(0, Math.min(z.length, n - p)), offset + done + p);
      }
      done += n;
    }
  }

  async flush(): Promise<void> {
    // streamOptimized: write grain tables, directory and footer so a flushed image is complete
    // (the next grain overwrites them again; close writes them once more)
    if (!this.readOnly && this.extents.some((e) => e.compressed)) {
      await this.lock.lock(async () => { for (const e of this.extents) await e.finish(); });
    }
    const seen = new Set<BlockNode>();
    for (const e of this.extents) {
      if (seen.has(e.file)) continue;
      seen.add(e.file);
      if (e.file.flush) await e.file.flush();
    }
    if (!seen.has(this.file) && this.file.flush) await this.file.flush();
  }

  async allocatedSize(): Promise<number> {
    const seen = new Set<BlockNode>([this.file]);
    let n = this.file.allocatedSize ? await this.file.allocatedSize() : this.file.size;
    for (const e of this.extents) {
      if (seen.has(e.file)) continue;
      seen.add(e.file);
      n += e.file.allocatedSize ? await e.file.allocatedSize() : e.file.size;
    }
    return n;
  }

  async infoExtra(): Promise<Record<string, unknown>> {
    const out: Record<string, unknown> = {};
    const e0 = this.extents[0];
    const same = this.extents.every((e) => e.flat === e0.flat && e.compressed === e0.compressed && (e.flat || e.clusterSize === e0.clusterSize));
    if (same && !e0.flat) out['cluster-size'] = e0.clusterSize;
    if (this.parentHint !== null) {
      out['backing-filename'] = this.parentHint;
      out['full-backing-filename'] = this.fullBacking ?? this.parentHint;
      out['backing-filename-format'] = 'vmdk';
    }
    return out;
  }

  async formatSpecific(): Promise<{ type: string; data: Record<string, unknown> }> {
    return {
      type: 'vmdk',
      data: {
        cid: this.cid,
        'parent-cid': this.parentCid,
        'create-type': this.createType,
        extents: this.extents.map((e) => {
          const x: Record<string, unknown> = {};
          if (e.compressed) x.compressed = true;
          x['virtual-size'] = e.size;
          x.filename = e.file.filename;
          if (!e.flat) x['cluster-size'] = e.clusterSize;
          x.format = e.type;
          return x;
        }),
      },
    };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    let err: unknown = null;
    if (!this.readOnly) {
      try {
        await this.flush();
      } catch (e) { err = e; }
    }
    const seen = new Set<BlockNode>();
    for (const e of this.extents) {
      if (seen.has(e.file) || e.file === this.file) continue;
      seen.add(e.file);
      await e.file.close().catch((x) => { err ??= x; });
    }
    await this.backing?.close().catch(() => undefined);
    await this.file.close().catch((x) => { err ??= x; });
    if (err) throw err;
  }
}
