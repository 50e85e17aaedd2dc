// A byte-bounded LRU of table pages keyed by file offset, safe against loads racing with
// writes: a page whose load overlapped a table update is returned but not cached, and an
// update makes later loads start afresh. Tables are written through; updates happen under the
// driver's metadata mutex, so lookups made under the mutex always see current entries.
export class PageCache {
  private map = new Map<number, Buffer>();
  private loading = new Map<number, Promise<Buffer>>();
  private bytes = 0;
  private version = 0;
  constructor(private maxBytes: number) {}

  async load(off: number, size: number, read: (b: Buffer, off: number) => Promise<void>): Promise<Buffer> {
    const hit = this.map.get(off);
    if (hit) { this.map.delete(off); this.map.set(off, hit); return hit; }
    let p = this.loading.get(off);
    if (!p) {
      const v = this.version;
      const q: Promise<Buffer> = (async () => {
        const b = Buffer.alloc(size);
        await read(b, off);
        if (this.version === v) this.insert(off, b);
        return b;
      })().finally(() => { if (this.loading.get(off) === q) this.loading.delete(off); });
      p = q;
      this.loading.set(off, p);
    }
    return p;
  }

  /** after the file was written: apply the same change to a cached page */
  update(off: number, fn: (page: Buffer) => void): void {
    this.version++;
    this.loading.delete(off);
    const b = this.map.get(off);
    if (b) fn(b);
  }

  private insert(off: number, b: Buffer): void {
    const old = this.map.get(off);
    if (old) { this.bytes -= old.length; this.map.delete(off); }
    this.map.set(off, b);
    this.bytes += b.length;
    while (this.bytes > this.maxBytes && this.map.size > 1) {
      const k = this.map.keys().next().value as number;
      this.bytes -= this.map.get(k)!.length;
      this.map.delete(k);
    }
  }

  clear(): void { this.version++; this.map.clear(); this.loading.clear(); this.bytes = 0; }
}
