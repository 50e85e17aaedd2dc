// The async mutex every format uses to serialise metadata updates (FIFO, not reentrant).
export class Mutex {
  private tail: Promise<void> = Promise.resolve();

  run<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.tail;
    let release!: () => void;
    this.tail = new Promise<void>((r) => { release = r; });
    return prev.then(fn).finally(release);
  }

  /** the same as run(); some drivers read better with this name */
  lock<T>(fn: () => Promise<T>): Promise<T> { return this.run(fn); }
}
