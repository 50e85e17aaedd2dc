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
