// Opens a LUKS volume of either version from a header I/O interface.
import { ImgError } from '../core/errors';
import { HeaderIO, LUKS_MAGIC, luks1Info, parseLuks1, UnlockedVolume, unlockLuks1 } from './luks1';

export function isLuks(head: Uint8Array): boolean {
  return head.length >= 8 && Buffer.from(head.buffer, head.byteOffset, 6).equals(LUKS_MAGIC);
}

export function secretHint(what: string, optName: string): string {
  return `${what} needs a secret: --object secret,id=sec0,file=PASSFILE -o ${optName}=sec0`;
}

/** Reads the header, unlocks a key slot with the passphrase. `payloadInIO`: the payload must lie
 *  within io.size (the luks driver; qcow2 keeps its payload elsewhere). */
export async function openLuks(io: HeaderIO, pass: Buffer, payloadInIO: boolean): Promise<UnlockedVolume> {
  const head = Buffer.alloc(Math.min(4096, io.size));
  if (head.length < 592) throw new ImgError('image', 'LUKS header is truncated');
  await io.read(head, 0);
  if (!isLuks(head)) throw new ImgError('image', 'Volume is not in LUKS format');
  const version = head.readUInt16BE(6);
  if (version === 1) {
    const hd = parseLuks1(head, io.size, payloadInIO);
    return unlockLuks1(hd, io, pass);
  }
  if (version === 2) {
    const { openLuks2 } = await import('./luks2');
    return openLuks2(io, pass);
  }
  throw new ImgError('image', `LUKS version ${version} is not supported`);
}

/** The header alone, without a passphrase (qemu-img info on a locked image); LUKS1 only. */
export async function readLuksHeaderInfo(io: HeaderIO): Promise<{ payloadOffset: number; info: Record<string, unknown> } | null> {
  const head = Buffer.alloc(Math.min(4096, io.size));
  if (head.length < 592) return null;
  await io.read(head, 0);
  if (!isLuks(head) || head.readUInt16BE(6) !== 1) return null;
  const hd = parseLuks1(head, io.size, true);
  return { payloadOffset: hd.payloadOffset, info: luks1Info(hd) };
}
