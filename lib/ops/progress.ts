// qemu-img style progress: "    (12.34/100%)" redrawn on stderr.
export class Progress {
  private last = -1;
  constructor(private enabled: boolean) {}
  update(done: number, total: number): void {
    if (!this.enabled) return;
    const pct = total > 0 ? Math.min(100, (done / total) * 100) : 100;
    if (pct - this.last < 0.5 && pct < 100) return;
    this.last = pct;
    process.stderr.write(`    (${pct.toFixed(2)}/100%)\r`);
  }
  done(): void {
    if (this.enabled) process.stderr.write(`    (100.00/100%)\n`);
  }
}
