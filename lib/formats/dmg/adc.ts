// Apple Data Compression (ADC) decoder: a byte-oriented LZ77 variant used by UDCO dmg chunks.
//   1xxxxxxx                 literal run of (x & 0x7f) + 1 bytes
//   01xxxxxx hhhhhhhh llllllll  copy (x & 0x3f) + 4 bytes from distance (h<<8|l) + 1
//   00xxxxyy llllllll         copy ((x>>2) & 0xf) + 3 bytes from distance (y<<8|l) + 1
/** Decompresses `src` into exactly `outLen` bytes; throws on malformed or mis-sized input. */
export function adcDecompress(src: Uint8Array, outLen: number): Buffer {
  const out = Buffer.alloc(outLen);
  let ip = 0;
  let op = 0;
  while (ip < src.length) {
    const b = src[ip++];
    if (b & 0x80) {
      const n = (b & 0x7f) + 1;
      if (ip + n > src.length) throw new Error('ADC literal runs past the input');
      if (op + n > outLen) throw new Error('ADC output is larger than declared');
      out.set(src.subarray(ip, ip + n), op);
      ip += n;
      op += n;
      continue;
    }
    let n: number;
    let dist: number;
    if (b & 0x40) {
      if (ip + 2 > src.length) throw new Error('ADC truncated copy code');
      n = (b & 0x3f) + 4;
      dist = ((src[ip] << 8) | src[ip + 1]) + 1;
      ip += 2;
    } else {
      if (ip + 1 > src.length) throw new Error('ADC truncated copy code');
      n = ((b >> 2) & 0xf) + 3;
      dist = (((b & 3) << 8) | src[ip]) + 1;
      ip += 1;
    }
    if (dist > op) throw new Error('ADC copy distance points before the start');
    if (op + n > outLen) throw new Error('ADC output is larger than declared');
    for (let k = 0; k < n; k++, op++) out[op] = out[op - dist];
  }
  if (op !== outLen) throw new Error(`ADC output is ${op} bytes, expected ${outLen}`);
  return out;
}
