// imgmount create: qemu-img create semantics.
import fs from 'node:fs';
import { ImgError } from '../core/errors';
import { openImage, resolveRelative } from '../core/graph';
import type { BlockNode } from '../core/node';
import { OptionTree, parseSize, setDotted } from '../core/options';
import { SecretStore } from '../core/secrets';
import { findDriver } from '../formats';

export interface CreateOptions {
  format: string;
  filename: string;
  size?: string | number | null;
  options?: OptionTree;
  backing?: string;
  backingFormat?: string;
  secrets?: SecretStore;
}

export async function createImage(o: CreateOptions): Promise<void> {
  const drv = findDriver(o.format);
  if (!drv.create) throw new ImgError('unsupported', `Format driver '${o.format}' does not support image creation`);
  const options: OptionTree = { ...(o.options ?? {}) };
  if (o.backing !== undefined) setDotted(options, 'backing_file', o.backing);
  if (o.backingFormat !== undefined) setDotted(options, 'backing_fmt', o.backingFormat);
  let size: number | null = null;
  if (o.size !== undefined && o.size !== null && o.size !== '') {
    size = typeof o.size === 'number' ? o.size : parseSize(o.size, 'Image size');
  } else if (typeof options.size === 'string') {
    size = parseSize(options.size, 'Image size');
  }
  if (size !== null) options.size = String(size);
  const secrets = o.secrets ?? new SecretStore();
  const existed = fs.existsSync(o.filename);
  const opened: BlockNode[] = [];
  try {
    await drv.create({
      options,
      secrets,
      size,
      filename: o.filename,
      open: async (name: string, format?: string) => {
        const n = await openImage(resolveRelative(name, o.filename), { format, readOnly: true, secrets });
        opened.push(n);
        return n;
      },
    });
  } catch (e) {
    // a failed create leaves nothing half-written behind
    if (!existed) { try { fs.unlinkSync(o.filename); } catch { /* never created */ } }
    throw e;
  } finally {
    for (const n of opened) await n.close().catch(() => undefined);
  }
}
