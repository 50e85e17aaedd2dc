import type { RawBlockCipher } from './cipher';
import { ImgError } from '../core/errors';
export class Serpent implements RawBlockCipher {
  constructor(_key: Uint8Array) { throw new ImgError('unsupported', 'serpent is not implemented yet'); }
  encryptBlock(): void { /* */ }
  decryptBlock(): void { /* */ }
}
