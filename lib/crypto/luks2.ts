import { ImgError } from '../core/errors';
import type { HeaderIO, UnlockedVolume } from './luks1';
export async function openLuks2(_io: HeaderIO, _pass: Buffer): Promise<UnlockedVolume> {
  throw new ImgError('unsupported', 'LUKS2 is not supported yet');
}
