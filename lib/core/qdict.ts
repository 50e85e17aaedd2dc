// qemu prints QAPI objects (info's JSON and its human dump alike) by walking a QDict, a hash
// table of 512 buckets: keys come out in the order of their bucket, whatever order the struct
// declares. Sorting by the same hash reproduces qemu's key order for any set of keys.

const BUCKETS = 512;

/** qemu's QDict hash (the tdb hash) of a key */
function bucketOf(key: string): number {
  let v = Math.imul(0x238f13af, key.length) >>> 0;
  for (let i = 0; i < key.length; i++) v = (v + ((key.charCodeAt(i) << ((i * 5) % 24)) >>> 0)) >>> 0;
  return ((Math.imul(1103515243, v) + 12345) >>> 0) % BUCKETS;
}

/** A deep copy of `value` whose objects list their keys in qemu's order (ties keep ours). */
export function qdictOrder<T>(value: T): T {
  if (Array.isArray(value)) return value.map((v) => qdictOrder(v)) as T;
  if (value === null || typeof value !== 'object' || Buffer.isBuffer(value)) return value;
  const keys = Object.keys(value as Record<string, unknown>);
  const order = keys.map((k, i) => ({ k, b: bucketOf(k), i })).sort((a, b) => a.b - b.b || a.i - b.i);
  const out: Record<string, unknown> = {};
  for (const { k } of order) out[k] = qdictOrder((value as Record<string, unknown>)[k]);
  return out as T;
}
