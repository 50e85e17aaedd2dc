import type { RawBlockCipher } from './cipher';
import { ImgError } from '../core/errors';
export class Twofish implements RawBlockCipher {
  constructor(_key: Uint8Array) { throw new ImgError('unsupported', 'twofish is not implemented yet'); }
  encryptBlock(): void { /* */ }
  decryptBlock(): void { /* */ }
}
