export function bzip2Decompress(_src: Uint8Array, _outLen: number): Buffer { throw new Error('bzip2 not implemented yet'); }
