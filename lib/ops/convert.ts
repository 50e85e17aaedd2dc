// imgmount convert: copy the guest view of any image into a new image of any format.
import fs from 'node:fs';
import { ImgError } from '../core/errors';
import { chainStatus, readAt, writeAt } from '../core/io';
import { openImage, OpenOptions } from '../core/graph';
import type { BlockNode } from '../core/node';
import type { OptionTree } from '../core/options';
import { SecretStore } from '../core/secrets';
import { createImage } from './create';
import { Progress } from './progress';

const CHUNK = 2 << 20;
/** formats whose writers honour WriteFlags.compressed */
export const COMPRESSING_FORMATS = ['qcow2', 'qcow', 'vmdk'];

export interface ConvertOptions {
  src: string;
  srcOpen: OpenOptions;
  dst: string;
  outFormat: string;
  outOptions?: OptionTree;
  compressed?: boolean;
  progress?: boolean;
  secrets?: SecretStore;
  /** keep zero detection from making the target sparse (-S 0) */
  noSparse?: boolean;
}

function isZero(b: Uint8Array): boolean {
  // compare 8 bytes at a time where possible
  const n = b.length & ~7;
  const dv = new DataView(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < n; i += 8) if (dv.getBigUint64(i, true) !== 0n) return false;
  for (let i = n; i < b.length; i++) if (b[i]) return false;
  return true;
}

const GRANULE = 64 << 10;

/** Copies the guest view in aligned windows; all-zero granules are skipped (sparse target). */
export async function copyNode(src: BlockNode, dst: BlockNode, o: { compressed?: boolean; noSparse?: boolean; progress?: Progress }): Promise<void> {
  const buf = Buffer.allocUnsafe(CHUNK);
  const flags = o.compressed ? { compressed: true } : undefined;
  for (let win = 0; win < src.size; win += CHUNK) {
    const len = Math.min(CHUNK, src.size - win);
    let hasData = !!o.noSparse;
    for (let p = win; p < win + len && !hasData;) {
      const ext = await chainStatus(src, p, win + len - p);
      hasData = ext.data;
      p += Math.max(1, ext.length);
    }
    if (hasData) {
      const b = buf.subarray(0, len);
      await readAt(src, b, win);
      // write runs of non-zero granules, each run in one request
      let runStart = -1;
      for (let g = 0; ; g = Math.min(len, g + GRANULE)) {
        const keep = g < len && (o.noSparse || !isZero(b.subarray(g, Math.min(len, g + GRANULE))));
        if (keep && runStart < 0) runStart = g;
        if (!keep && runStart >= 0) {
          await writeAt(dst, b.subarray(runStart, g), win + runStart, flags);
          runStart = -1;
        }
        if (g >= len) break; // the last (possibly short) granule has been looked at
      }
    }
    o.progress?.update(win + len, src.size);
  }
  if (dst.flush) await dst.flush();
  o.progress?.done();
}

export async function convertImage(o: ConvertOptions): Promise<void> {
  const secrets = o.secrets ?? new SecretStore();
  if (o.compressed && !COMPRESSING_FORMATS.includes(o.outFormat)) {
    throw new ImgError('usage', `convert: Compression not supported for the ${o.outFormat} format`);
  }
  const src = await openImage(o.src, { ...o.srcOpen, readOnly: true, secrets });
  let created = false;
  let dst: BlockNode | null = null;
  try {
    if (fs.existsSync(o.dst) && fs.statSync(o.dst).isDirectory()) throw new ImgError('usage', `${o.dst}: Is a directory`);
    await createImage({ format: o.outFormat, filename: o.dst, size: src.size, options: o.outOptions, secrets });
    created = true;
    dst = await openImage(o.dst, { format: o.outFormat, readOnly: false, secrets, options: secretOptions(o.outOptions) });
    if (dst.size < src.size) throw new ImgError('image', `${o.dst}: created image is smaller than the source`);
    await copyNode(src, dst, { compressed: o.compressed, noSparse: o.noSparse, progress: new Progress(!!o.progress) });
    await dst.close();
    dst = null;
  } catch (e) {
    if (dst) await dst.close().catch(() => undefined);
    // a failed convert leaves no half-written target
    if (created) { try { fs.unlinkSync(o.dst); } catch { /* gone */ } }
    throw e;
  } finally {
    await src.close();
  }
}

/** as qemu-img convert: the target is opened with the secrets its creation options named
 *  (luks key-secret, qcow/qcow2 encrypt.key-secret) */
function secretOptions(opts: OptionTree | undefined): OptionTree | undefined {
  if (!opts) return undefined;
  const out: OptionTree = {};
  if (typeof opts['key-secret'] === 'string') out['key-secret'] = opts['key-secret'];
  const enc = opts.encrypt;
  if (enc && typeof enc !== 'string' && typeof enc['key-secret'] === 'string') out.encrypt = { 'key-secret': enc['key-secret'] };
  return Object.keys(out).length ? out : undefined;
}
