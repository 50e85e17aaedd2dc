// A small byte-bounded LRU of decompressed chunks, shared by the read-only compressed formats
// (dmg, cloop). Concurrent requests for the same chunk share one decompression.
export class ChunkCache {
  private map = new Map<number, Buffer>();
  private pending = new Map<number, Promise<Buffer>>();
  private bytes = 0;
  constructor(private readonly maxBytes: number) {}

  async get(key: number, load: () => Promise<Buffer>): Promise<Buffer> {
    const hit = this.map.get(key);
    if (hit) {
      this.map.delete(key);
      this.map.set(key, hit);
      return hit;
    }
    const p = this.pending.get(key);
    if (p) return p;
    const q = load().then((b) => {
      this.put(key, b);
      return b;
    }).finally(() => this.pending.delete(key));
    this.pending.set(key, q);
    return q;
  }

  /** true when the chunk is cached or being loaded */
  has(key: number): boolean { return this.map.has(key) || this.pending.has(key); }

  /**
   * Readahead for sequential readers: starts loading `keys` in the background (they land in
   * the cache), at most `limit` loads in flight at once. Errors are left for the real read.
   */
  prefetch(keys: number[], load: (k: number) => Promise<Buffer>, limit: number): void {
    for (const k of keys) {
      if (this.pending.size >= limit) return;
      if (this.has(k)) continue;
      this.get(k, () => load(k)).catch(() => undefined);
    }
  }

  private put(key: number, b: Buffer): void {
    if (b.length > this.maxBytes) return;
    this.map.set(key, b);
    this.bytes += b.length;
    for (const [k, v] of this.map) {
      if (this.bytes <= this.maxBytes) break;
      this.map.delete(k);
      this.bytes -= v.length;
    }
  }

  clear(): void { this.map.clear(); this.bytes = 0; }
  get size(): number { return this.bytes; }
}
