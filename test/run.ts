// npm test: runs the node-tap suite and ends with the plain line `N passed, N failed[, N skipped]`
// taken from tap's own summary, so any CI reader sees the counts.
import { spawn } from 'node:child_process';
import path from 'node:path';

const root = path.resolve(__dirname, '..', '..');
const tapBin = path.join(root, 'node_modules', 'tap', 'dist', 'esm', 'run.mjs');
const args = process.argv.slice(2);
const files = args.length ? args : ['dist/test/**/*.test.js'];
const child = spawn(process.execPath, [tapBin, '--reporter=tap', ...files], { cwd: root, stdio: ['ignore', 'pipe', 'inherit'] });
let tail = '';
child.stdout.on('data', (d: Buffer) => {
  process.stdout.write(d);
  tail = (tail + d.toString()).slice(-4096);
});
child.on('exit', (code, signal) => {
  const m = /# \{ total: (\d+)(?:, pass: (\d+))?(?:, fail: (\d+))?(?:, todo: (\d+))?(?:, skip: (\d+))? \}/.exec(tail);
  const pass = m ? Number(m[2] ?? 0) : 0;
  let fail = m ? Number(m[3] ?? 0) : 0;
  const skip = m ? Number(m[5] ?? 0) : 0;
  if (!m || (code !== 0 && fail === 0)) fail += 1; // a crashed or empty run is a failure
  process.stdout.write(`\n${pass} passed, ${fail} failed${skip ? `, ${skip} skipped` : ''}\n`);
  process.exit(code ?? (signal ? 1 : 0));
});
