export function lzmaDecompress(_src: Uint8Array, _outLen: number): Buffer { throw new Error('LZMA chunks are not supported'); }
