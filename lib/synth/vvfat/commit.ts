import { ImgError } from '../../core/errors';
import type { VvfatNode } from './node';
export async function commit(_node: VvfatNode): Promise<void> {
  throw new ImgError('unsupported', 'vvfat: writing back is not implemented yet');
}
