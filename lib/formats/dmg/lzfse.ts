export function lzfseDecompress(_src: Uint8Array, _outLen: number): Buffer { throw new Error('LZFSE not implemented yet'); }
