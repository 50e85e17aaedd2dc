// `npm run bench [-- options]`: imgmount against qemu-storage-daemon's FUSE export.
//
// For every scenario both sides get their own copy of the same image. For each round,
// each fio job runs on imgmount and on qemu-storage-daemon (the side that goes first
// alternates per round); every run is: drop the page cache, mount, fio, unmount. The
// ratio per job is median(imgmount) / median(qemu-storage-daemon). The result is written
// to BENCHMARKS.md.
//
// Hygiene: the bench process never touches a mount itself (fio, cp, qemu-img ... are
// child processes); every mount and every qemu-storage-daemon is stopped in a finally
// block, and SIGINT/SIGTERM abort the current run and go through those finally blocks.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { writeUdif } from './udif';

const ROOT = path.resolve(__dirname, '..', '..');
const IMGMOUNT = path.join(ROOT, 'bin', 'imgmount');
const GiB = 1024 * 1024 * 1024;
const TARGET = 1.1;

// ---------------------------------------------------------------- options

interface Options {
  rounds: number;
  runtime: number;
  scenarios: string[] | null; // null = all
  jobs: string[] | null; // null = all
  dir: string;
  out: string | null; // null = do not write
  threads: number | null;
  dropCaches: boolean;
}

const USAGE = `usage: npm run bench -- [--rounds N] [--runtime SEC] [--scenario NAME[,NAME...]]
        [--job NAME[,NAME...]] [--dir DIR] [--out FILE | --no-write] [--threads N] [--no-drop-caches]
  --rounds N        rounds per job (default 3)
  --runtime SEC     fio runtime per run, after a 1 s ramp (default 8)
  --scenario LIST   scenarios to run (default: all; known: %SCENARIOS%)
  --job LIST        fio jobs to run (default: all; known: %JOBS%)
  --dir DIR         where the temporary directory goes (default: ${defaultScratch()})
  --out FILE        where the report goes (default: BENCHMARKS.md in the package root)
  --no-write        print the report instead of writing it
  --threads N       pass the hidden --threads N to imgmount mount (for investigations)
  --no-drop-caches  do not drop the page cache between runs`;

/**
 * The images live in RAM (/dev/shm) when there is room: both FUSE servers write into the
 * page cache either way, but on a disk the kernel throttles writers to what the disk (here a
 * VM disk whose throughput collapses after sustained writes) can absorb, and the figures
 * then measure the disk instead of the two data paths. --dir chooses a disk.
 */
function defaultScratch(): string {
  try {
    const st = fs.statfsSync('/dev/shm');
    if (st.type === 0x01021994 /* TMPFS_MAGIC */ && st.bavail * st.bsize >= 10 * 2 ** 30) return '/dev/shm';
  } catch { /* no /dev/shm */ }
  return os.tmpdir();
}

function parseArgs(argv: string[]): Options {
  const o: Options = {
    rounds: 3, runtime: 8, scenarios: null, jobs: null, dir: defaultScratch(),
    out: path.join(ROOT, 'BENCHMARKS.md'), threads: null, dropCaches: true,
  };
  const list = (v: string): string[] => v.split(',').map((s) => s.trim()).filter(Boolean);
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i];
    let val: string | undefined;
    const eq = a.indexOf('=');
    if (a.startsWith('--') && eq > 0) { val = a.slice(eq + 1); a = a.slice(0, eq); }
    const next = (): string => {
      if (val !== undefined) return val;
      const v = argv[++i];
      if (v === undefined) usage(`${a} needs a value`);
      return v;
    };
    const posInt = (v: string): number => {
      const n = Number(v);
      if (!Number.isInteger(n) || n <= 0) usage(`${a}: not a positive integer: ${v}`);
      return n;
    };
    switch (a) {
      case '--rounds': o.rounds = posInt(next()); break;
      case '--runtime': o.runtime = posInt(next()); break;
      case '--scenario': case '--scenarios': o.scenarios = list(next()); break;
      case '--job': case '--jobs': o.jobs = list(next()); break;
      case '--dir': o.dir = path.resolve(next()); break;
      case '--out': o.out = path.resolve(next()); break;
      case '--no-write': o.out = null; break;
      case '--threads': o.threads = posInt(next()); break;
      case '--no-drop-caches': o.dropCaches = false; break;
      case '-h': case '--help': process.stdout.write(usageText() + '\n'); process.exit(0); break;
      default: usage(`unknown argument: ${a}`);
    }
  }
  for (const s of o.scenarios ?? []) if (!SCENARIOS.some((x) => x.name === s)) usage(`unknown scenario: ${s}`);
  for (const j of o.jobs ?? []) if (!JOBS.some((x) => x.name === j)) usage(`unknown job: ${j}`);
  return o;
}

function usageText(): string {
  return USAGE.replace('%SCENARIOS%', SCENARIOS.map((s) => s.name).join(', '))
    .replace('%JOBS%', JOBS.map((j) => j.name).join(', '));
}

function usage(msg: string): never {
  process.stderr.write(`bench: ${msg}\n${usageText()}\n`);
  process.exit(1);
}

function log(msg: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
}

// ---------------------------------------------------------------- child processes

class Aborted extends Error {}
let aborted: string | null = null;
const liveChildren = new Set<ChildProcess>();

function checkAbort(): void {
  if (aborted) throw new Aborted(`interrupted by ${aborted}`);
}

interface RunResult { code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }

/** runs a command to completion (asynchronously, so that signals are handled meanwhile) */
function run(cmd: string, args: string[], timeoutSec = 600): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    liveChildren.add(child);
    let stdout = '';
    let stderr = '';
    child.stdout!.setEncoding('utf8').on('data', (d: string) => { stdout += d; });
    child.stderr!.setEncoding('utf8').on('data', (d: string) => { stderr += d; });
    const timer = setTimeout(() => {
      stderr += `\n(bench: killed after ${timeoutSec} s)`;
      child.kill('SIGKILL');
    }, timeoutSec * 1000);
    child.on('error', (e) => { clearTimeout(timer); liveChildren.delete(child); reject(e); });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      liveChildren.delete(child);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

function describe(cmd: string, args: string[], r: RunResult): string {
  const why = r.signal ? `signal ${r.signal}` : `exit ${r.code}`;
  const msg = (r.stderr.trim() || r.stdout.trim()).split('\n').slice(-5).join(' | ');
  return `${cmd} ${args.join(' ')}: ${why}${msg ? `: ${msg}` : ''}`;
}

async function runOk(cmd: string, args: string[], timeoutSec = 600): Promise<RunResult> {
  const r = await run(cmd, args, timeoutSec);
  if (r.code !== 0) throw new Error(describe(cmd, args, r));
  return r;
}

function firstLine(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 20000 });
  return r.status === 0 ? r.stdout.split('\n')[0].trim() : `unknown (${cmd}: ${r.error?.message ?? `exit ${r.status}`})`;
}

function fuseMountsUnder(prefix: string): string[] {
  const out: string[] = [];
  for (const line of fs.readFileSync('/proc/mounts', 'utf8').split('\n')) {
    const f = line.split(' ');
    if (f.length < 3) continue;
    const mp = f[1].replace(/\\040/g, ' ').replace(/\\011/g, '\t').replace(/\\134/g, '\\');
    if ((mp === prefix || mp.startsWith(prefix + '/')) && f[2].startsWith('fuse')) out.push(mp);
  }
  return out;
}

function isMounted(mp: string): boolean {
  return fuseMountsUnder(mp).includes(mp);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

let dropCachesWarned = false;
async function dropCaches(o: Options): Promise<void> {
  if (!o.dropCaches) return;
  const r = await run('sh', ['-c', 'sync && echo 3 > /proc/sys/vm/drop_caches'], 120);
  if (r.code !== 0 && !dropCachesWarned) {
    dropCachesWarned = true;
    log(`warning: cannot drop the page cache (${describe('sh', ['-c', '...'], r)}); runs are not cold`);
    dropCacheFailure = describe('drop_caches', [], r);
  }
}
let dropCacheFailure: string | null = null;
const loadAtStart = os.loadavg()[0];

// ---------------------------------------------------------------- the two sides

/** a mounted export: `file` is what fio opens; stop() is idempotent and never throws;
 *  jsRequests: after stop(), how many requests imgmount served in JavaScript (from its log) */
interface Mounted { file: string; stop(): Promise<void>; stopSync(): void; jsRequests?: number }

/** resources that must go away even if the process is being torn down */
const liveMounts = new Set<Mounted>();

interface Side {
  key: 'imgmount' | 'qsd';
  label: string;
  /** base: the shared scratch directory (as for Scenario.prepare); where: the scenario's own */
  mount(image: string, sc: Scenario, base: string, where: string, o: Options): Promise<Mounted>;
}

const imgmountSide: Side = {
  key: 'imgmount',
  label: 'imgmount',
  async mount(image, sc, base, where, o) {
    const mnt = path.join(where, 'mnt-imgmount');
    // --debug: the server logs how many requests it served in JavaScript when it stops
    const args = [IMGMOUNT, 'mount', '--debug', '-f', sc.format, ...(sc.readOnly ? ['-r'] : []), ...(sc.imgmountArgs?.(base) ?? []),
      ...(o.threads ? ['--threads', String(o.threads)] : []), image, mnt];
    let stopped = false;
    let serverLog: string | null = null;
    const m: Mounted = {
      file: path.join(mnt, 'disk.raw'),
      async stop() {
        if (stopped) return;
        stopped = true;
        liveMounts.delete(m);
        let r = await run(process.execPath, [IMGMOUNT, 'unmount', mnt], 300);
        if (serverLog) {
          try {
            const found = [...fs.readFileSync(serverLog, 'utf8').matchAll(/in JavaScript: (\d+)/g)].pop();
            if (found) m.jsRequests = Number(found[1]);
            fs.unlinkSync(serverLog);
          } catch { /* no log: the count stays unknown */ }
        }
        if (r.code !== 0 && isMounted(mnt)) {
          log(`warning: ${describe('imgmount', ['unmount', mnt], r)}; retrying with --force`);
          r = await run(process.execPath, [IMGMOUNT, 'unmount', '--force', mnt], 120);
        }
        if (isMounted(mnt)) {
          log(`warning: ${mnt} still mounted; lazy umount`);
          await run('umount', ['-l', mnt], 60);
        }
        try { fs.rmdirSync(mnt); } catch { /* removed by unmount, or never made */ }
      },
      stopSync() {
        if (stopped) return;
        stopped = true;
        liveMounts.delete(m);
        spawnSync(process.execPath, [IMGMOUNT, 'unmount', '--force', mnt], { stdio: 'ignore', timeout: 60000 });
        if (isMounted(mnt)) spawnSync('umount', ['-l', mnt], { stdio: 'ignore', timeout: 30000 });
      },
    };
    liveMounts.add(m);
    try {
      const r = await runOk(process.execPath, args, 120);
      serverLog = /server log: (.+)/.exec(r.stderr)?.[1]?.trim() ?? null;
      // a log left by an earlier run on the same mountpoint would be counted again
      if (serverLog) fs.writeFileSync(serverLog, '');
    } catch (e) {
      await m.stop();
      throw e;
    }
    return m;
  },
};

const qsdSide: Side = {
  key: 'qsd',
  label: 'qemu-storage-daemon',
  async mount(image, sc, _base, where) {
    const mnt = path.join(where, 'mnt-qsd');
    fs.writeFileSync(mnt, ''); // the FUSE export's mountpoint is a regular file
    const ro = sc.readOnly ? ',read-only=on' : '';
    const args = [
      ...(sc.qsdArgs ?? []),
      '--blockdev', `driver=file,node-name=file0,filename=${image},cache.direct=off${ro}`,
      '--blockdev', `driver=${sc.format},node-name=fmt0,file=file0${ro}${sc.qsdFormatOptions ? ',' + sc.qsdFormatOptions : ''}`,
      '--export', `type=fuse,id=exp0,node-name=fmt0,mountpoint=${mnt},writable=${sc.readOnly ? 'off' : 'on'}`,
    ];
    const child = spawn('qemu-storage-daemon', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr!.setEncoding('utf8').on('data', (d: string) => { stderr += d; });
    let exited = false;
    const exit = new Promise<void>((resolve) => {
      child.on('close', () => { exited = true; resolve(); });
      child.on('error', (e) => { stderr += String(e); exited = true; resolve(); });
    });
    let stopped = false;
    const m: Mounted = {
      file: mnt,
      async stop() {
        if (stopped) return;
        stopped = true;
        liveMounts.delete(m);
        if (!exited) {
          child.kill('SIGTERM');
          const t = setTimeout(() => { log('warning: qemu-storage-daemon ignores SIGTERM; SIGKILL'); child.kill('SIGKILL'); }, 60000);
          await exit;
          clearTimeout(t);
        }
        if (isMounted(mnt)) {
          log(`warning: ${mnt} still mounted after qemu-storage-daemon exited; lazy umount`);
          await run('umount', ['-l', mnt], 60);
        }
        try { fs.unlinkSync(mnt); } catch { /* gone */ }
      },
      stopSync() {
        if (stopped) return;
        stopped = true;
        liveMounts.delete(m);
        if (!exited) child.kill('SIGTERM');
        for (let i = 0; i < 100 && isMounted(mnt); i++) spawnSync('sleep', ['0.1']);
        if (isMounted(mnt)) { child.kill('SIGKILL'); spawnSync('umount', ['-l', mnt], { stdio: 'ignore', timeout: 30000 }); }
      },
    };
    liveMounts.add(m);
    try {
      const deadline = Date.now() + 30000;
      while (!isMounted(mnt)) {
        if (exited) throw new Error(`qemu-storage-daemon exited before mounting: ${stderr.trim()}`);
        if (Date.now() > deadline) throw new Error(`qemu-storage-daemon did not mount ${mnt} within 30 s: ${stderr.trim()}`);
        checkAbort();
        await sleep(50);
      }
    } catch (e) {
      await m.stop();
      throw e;
    }
    return m;
  },
};

const SIDES: Side[] = [imgmountSide, qsdSide];

// ---------------------------------------------------------------- fio jobs

interface Job { name: string; title: string; rw: string; bs: string; iodepth: number; write: boolean }

const JOBS: Job[] = [
  { name: 'seqread', title: 'seqread 1M QD4', rw: 'read', bs: '1M', iodepth: 4, write: false },
  { name: 'randread', title: 'randread 4k QD16', rw: 'randread', bs: '4k', iodepth: 16, write: false },
  { name: 'randwrite', title: 'randwrite 4k QD16', rw: 'randwrite', bs: '4k', iodepth: 16, write: true },
  { name: 'seqwrite', title: 'seqwrite 1M QD4', rw: 'write', bs: '1M', iodepth: 4, write: true },
];

interface Sample { mibs: number; iops: number; /** imgmount only: requests served in JavaScript */ js?: number }

async function fio(job: Job, file: string, size: number, o: Options, once: boolean): Promise<Sample> {
  const args = [
    `--name=${job.name}`, `--filename=${file}`, '--ioengine=libaio', '--direct=1',
    `--rw=${job.rw}`, `--bs=${job.bs}`, `--iodepth=${job.iodepth}`, `--size=${size}`,
    '--numjobs=1', '--group_reporting', '--output-format=json',
    ...(once ? [] : ['--time_based', `--runtime=${o.runtime}`, '--ramp_time=1']),
  ];
  const r = await run('fio', args, o.runtime + 300);
  checkAbort();
  if (r.code !== 0) throw new Error(describe('fio', args, r));
  const start = r.stdout.indexOf('{');
  if (start < 0) throw new Error(`fio printed no JSON: ${r.stdout.slice(0, 300)} ${r.stderr.slice(0, 300)}`);
  const data = JSON.parse(r.stdout.slice(start)) as { jobs: Array<Record<string, { bw: number; iops: number }> & { error?: number }> };
  const j = data.jobs[0];
  if (j.error) throw new Error(`fio job ${job.name} on ${file} failed with error ${j.error}`);
  const d = j[job.write ? 'write' : 'read'];
  return { mibs: d.bw / 1024, iops: d.iops };
}

// ---------------------------------------------------------------- scenarios

interface Scenario {
  name: string;
  /** the driver name for both sides (imgmount -f and qemu-storage-daemon's blockdev) */
  format: string;
  description: string;
  /** makes the master image in dir (shared scratch directory) and returns its path */
  prepare(dir: string): Promise<string>;
  /** subset of JOBS (default: all) */
  jobs?: string[];
  /** every run gets a fresh copy of the master (e.g. allocating writes must find nothing allocated) */
  freshPerRun?: boolean;
  /** fio writes the whole file exactly once instead of running time-based */
  once?: boolean;
  /** at least this many rounds (short runs are noisier; more samples steady the median) */
  minRounds?: number;
  /** returns why the scenario cannot run with this imgmount, or null */
  skipReason?(image: string): Promise<string | null>;
  /** both sides export read-only (imgmount -r; qemu-storage-daemon read-only=on, writable=off) */
  readOnly?: boolean;
  /** extra `imgmount mount` arguments, e.g. --object/-o (dir: the shared scratch directory, as for prepare) */
  imgmountArgs?(dir: string): string[];
  /** extra qemu-storage-daemon arguments before the blockdevs (e.g. --object) */
  qsdArgs?: string[];
  /** options appended to qemu-storage-daemon's format blockdev (e.g. key-secret=sec0) */
  qsdFormatOptions?: string;
}

const randomRawCache = new Map<string, Promise<string>>();
/** a 1 GiB raw file full of random data, made once per scratch directory */
function randomRaw(dir: string): Promise<string> {
  let p = randomRawCache.get(dir);
  if (!p) {
    p = (async () => {
      const f = path.join(dir, 'random-1G.raw');
      log('making a 1 GiB raw image of random data');
      await runOk('sh', ['-c', `head -c 1G /dev/urandom > "${f}"`], 600);
      return f;
    })();
    randomRawCache.set(dir, p);
  }
  return p;
}

const compressibleCache = new Map<string, Promise<string>>();
/** a 256 MiB raw file: 128 MiB of random data, then 128 MiB of text lines (numbered, otherwise
 *  the same), made once per scratch directory; the source of the compressed read-only formats */
function compressibleRaw(dir: string): Promise<string> {
  let p = compressibleCache.get(dir);
  if (!p) {
    p = (async () => {
      const f = path.join(dir, 'mixed-256M.raw');
      log('making a 256 MiB raw image: half random data, half text');
      await runOk('sh', ['-c', `{ head -c 128M /dev/urandom && `
        + `seq -f 'line %010.0f: the quick brown fox jumps over the lazy dog' 1 3000000 | head -c 128M; } > "${f}"`], 600);
      if (fs.statSync(f).size !== 256 * 1024 * 1024) throw new Error(`${f}: not 256 MiB`);
      return f;
    })();
    compressibleCache.set(dir, p);
  }
  return p;
}

const LUKS_PASS = 'benchpass';
const LUKS_QEMU_SECRET = `secret,id=sec0,data=${LUKS_PASS}`;

async function imgmountInfoSkip(image: string, format: string): Promise<string | null> {
  const args = [IMGMOUNT, 'info', '-f', format, image];
  const r = await run(process.execPath, args, 120);
  if (r.code === 0) return null;
  const line = (r.stderr.trim() || r.stdout.trim()).split('\n').pop() ?? '';
  return `\`imgmount info -f ${format}\` fails on the image (exit ${r.code}${line ? `: ${line}` : ''})`;
}

/** a write-once scenario: fio fills a fresh image once per run (runScenario settles memory
 *  before each run, adds a warm-up round and keeps the round count even for these) */
const WRITE_ONCE: Pick<Scenario, 'minRounds' | 'jobs' | 'freshPerRun' | 'once'> = {
  minRounds: 12, jobs: ['seqwrite', 'randwrite'], freshPerRun: true, once: true,
};

const SCENARIOS: Scenario[] = [
  {
    name: 'raw',
    format: 'raw',
    description: '1 GiB raw file filled with random data',
    prepare: (dir) => randomRaw(dir),
  },
  {
    name: 'qcow2',
    format: 'qcow2',
    description: '1 GiB fully allocated qcow2 (`qemu-img convert -O qcow2` of the random raw file)',
    async prepare(dir) {
      const f = path.join(dir, 'full.qcow2');
      await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', await randomRaw(dir), f], 600);
      return f;
    },
    skipReason: (image) => imgmountInfoSkip(image, 'qcow2'),
  },
  {
    name: 'qcow2-alloc',
    format: 'qcow2',
    description: 'allocating writes: fio writes the whole of an empty 1 GiB qcow2 once, in order (1 MiB) and in random '
      + `order (4 KiB, every block once); fresh image per run, at least ${WRITE_ONCE.minRounds} rounds, as a sequential run `
      + 'lasts about a second',
    async prepare(dir) {
      const f = path.join(dir, 'empty.qcow2');
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', f, '1G'], 60);
      return f;
    },
    ...WRITE_ONCE,
    skipReason: (image) => imgmountInfoSkip(image, 'qcow2'),
  },
  {
    name: 'raw-alloc',
    format: 'raw',
    description: 'the same write-once jobs on a sparse 1 GiB raw file (fresh per run): what the file system allows '
      + 'without any format metadata, for comparison with qcow2-alloc',
    async prepare(dir) {
      const f = path.join(dir, 'empty.raw');
      fs.writeFileSync(f, '');
      fs.truncateSync(f, 1 << 30);
      return f;
    },
    ...WRITE_ONCE,
    skipReason: (image) => imgmountInfoSkip(image, 'raw'),
  },
  {
    name: 'luks',
    format: 'luks',
    description: '1 GiB LUKS1 image (aes-256-xts-plain64, sha256), every sector written (`qemu-io write -P 0x5a`); '
      + 'passphrase via `--object secret` on both sides',
    async prepare(dir) {
      const f = path.join(dir, 'full.luks');
      // imgmount reads the passphrase from a file, as a user would (qemu-storage-daemon gets data=)
      fs.writeFileSync(path.join(dir, 'luks.pass'), LUKS_PASS, { mode: 0o600 });
      const create = ['create', '-q', '-f', 'luks', '--object', LUKS_QEMU_SECRET,
        '-o', 'key-secret=sec0,iter-time=10,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256', f, '1G'];
      // qemu's PBKDF2 calibration now and then fails with "Unable to get accurate CPU usage"
      // (it measured 0 ms of thread CPU time): try again
      for (let attempt = 1; ; attempt++) {
        const r = await run('qemu-img', create, 60);
        if (r.code === 0) break;
        if (attempt >= 20 || !/accurate CPU usage/.test(r.stderr)) throw new Error(describe('qemu-img', create, r));
        log(`qemu-img create -f luks: ${r.stderr.trim()}; retrying`);
        checkAbort();
      }
      await runOk('qemu-io', ['--object', LUKS_QEMU_SECRET, '--image-opts', `driver=luks,key-secret=sec0,file.filename=${f}`,
        '-c', 'write -q -P 0x5a 0 512M', '-c', 'write -q -P 0x5a 512M 512M'], 600);
      return f;
    },
    imgmountArgs: (dir) => ['--object', `secret,id=sec0,file=${path.join(dir, 'luks.pass')}`, '-o', 'key-secret=sec0'],
    qsdArgs: ['--object', LUKS_QEMU_SECRET],
    qsdFormatOptions: 'key-secret=sec0',
  },
  {
    name: 'cloop',
    format: 'cloop',
    description: 'read-only: 256 MiB (half random, half text) compressed with `create_compressed_fs -B 65536` (zlib, 64 KiB blocks)',
    async prepare(dir) {
      const f = path.join(dir, 'mixed.cloop');
      await runOk('create_compressed_fs', ['-q', '-B', '65536', await compressibleRaw(dir), f], 600);
      return f;
    },
    jobs: ['seqread'],
    readOnly: true,
    skipReason: (image) => imgmountInfoSkip(image, 'cloop'),
  },
  {
    name: 'dmg-zlib',
    format: 'dmg',
    description: 'read-only: UDZO dmg (zlib, 1 MiB chunks; written by bench/udif.ts) of 256 MiB (half random, half text)',
    async prepare(dir) {
      const f = path.join(dir, 'mixed.dmg');
      writeUdif(await compressibleRaw(dir), f);
      return f;
    },
    jobs: ['seqread'],
    readOnly: true,
    skipReason: (image) => imgmountInfoSkip(image, 'dmg'),
  },
];

// ---------------------------------------------------------------- the benchmark

interface JobResult { job: Job; samples: Record<Side['key'], Sample[]> }
interface ScenarioResult { scenario: Scenario; skipped: string | null; results: JobResult[]; size: number }

/** how long after the last write-once image was deleted the next write-once fio starts (see
 *  runScenario): 3 s (paused before mounting) left imgmount behind in every pair after the
 *  qcow2 scenario; from 4.5 s on both sides ran at full speed */
const SETTLE_MS = 6000;

async function copyImage(src: string, dst: string): Promise<void> {
  try { fs.unlinkSync(dst); } catch { /* none */ }
  await runOk('cp', ['--reflink=auto', '--sparse=always', src, dst], 600);
}

async function virtualSize(image: string, format: string): Promise<number> {
  const r = await runOk('qemu-img', ['info', '-U', '-f', format, '--output=json', image], 60);
  return (JSON.parse(r.stdout) as { 'virtual-size': number })['virtual-size'];
}

async function runScenario(sc: Scenario, base: string, o: Options): Promise<ScenarioResult> {
  const dir = path.join(base, sc.name);
  fs.mkdirSync(dir);
  log(`scenario ${sc.name}: ${sc.description}`);
  const master = await sc.prepare(base);
  const size = await virtualSize(master, sc.format);
  const jobs = JOBS.filter((j) => (!sc.jobs || sc.jobs.includes(j.name)) && (!o.jobs || o.jobs.includes(j.name)));
  const res: ScenarioResult = { scenario: sc, skipped: null, results: [], size };
  if (sc.skipReason) {
    res.skipped = await sc.skipReason(master);
    if (res.skipped) { log(`scenario ${sc.name} skipped: ${res.skipped}`); return res; }
  }
  if (jobs.length === 0) { res.skipped = 'no job selected'; return res; }
  const images: Record<Side['key'], string> = {
    imgmount: path.join(dir, `imgmount.${sc.format}`),
    qsd: path.join(dir, `qsd.${sc.format}`),
  };
  if (!sc.freshPerRun) for (const s of SIDES) await copyImage(master, images[s.key]);
  for (const job of jobs) res.results.push({ job, samples: { imgmount: [], qsd: [] } });
  let rounds = Math.max(o.rounds, sc.minRounds ?? 0);
  // Which side goes first alternates per round. Write-once runs showed a strong position
  // effect (the run that follows the same side's run was slow, on both sides), so an odd
  // count would give one side one more slow sample: those scenarios run an even count.
  if (sc.freshPerRun && rounds % 2) rounds++;
  /** when the last write-once image was deleted (the scenarios before freed memory too) */
  let freedAt = Date.now();
  // write-once scenarios start with an uncounted round: the first allocations after the
  // scenarios before (which freed several GiB) were slow on both sides
  for (let round = sc.freshPerRun ? -1 : 0; round < rounds; round++) {
    const order = round % 2 === 0 ? SIDES : [...SIDES].reverse();
    for (const jr of res.results) {
      for (const side of order) {
        checkAbort();
        if (sc.freshPerRun) await copyImage(master, images[side.key]);
        await dropCaches(o);
        checkAbort();
        const m = await side.mount(images[side.key], sc, base, dir, o);
        let s: Sample;
        try {
          // memory freed just before (the last run's image) is handed back to the hypervisor
          // in passes for some seconds on a VM, and a run that allocates meanwhile is slowed
          // at random. fio starts the same time after that free on both sides: a pause before
          // mounting instead let the side that mounts more slowly (imgmount starts Node) run
          // later into that window every time, and lose in every pair
          if (sc.freshPerRun) await sleep(Math.max(0, freedAt + SETTLE_MS - Date.now()));
          checkAbort();
          s = await fio(jr.job, m.file, size, o, !!sc.once);
        } finally {
          await m.stop();
        }
        if (m.jsRequests !== undefined) s.js = m.jsRequests;
        // the image goes at once, so no run allocates next to the other side's image
        if (sc.freshPerRun) {
          try { fs.unlinkSync(images[side.key]); } catch { /* none */ }
          freedAt = Date.now();
        }
        if (round >= 0) jr.samples[side.key].push(s);
        log(`${sc.name} ${round >= 0 ? `round ${round + 1}/${rounds}` : 'warm-up round (not counted)'} ${jr.job.name} ${side.label}: ${s.mibs.toFixed(1)} MiB/s, ${Math.round(s.iops)} IOPS`);
      }
    }
  }
  for (const s of SIDES) { try { fs.unlinkSync(images[s.key]); } catch { /* none */ } }
  return res;
}

// ---------------------------------------------------------------- report

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const n = s.length;
  return n === 0 ? NaN : n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

function machine(o: Options): string[] {
  const cpuinfo = fs.readFileSync('/proc/cpuinfo', 'utf8');
  const model = /^model name\s*:\s*(.*)$/m.exec(cpuinfo)?.[1]
    ?? /^(?:Hardware|CPU part|uarch)\s*:\s*(.*)$/m.exec(cpuinfo)?.[1] ?? 'unknown';
  const memKiB = Number(/^MemTotal:\s*(\d+)/m.exec(fs.readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0);
  const df = spawnSync('df', ['--output=source,fstype', o.dir], { encoding: 'utf8' }).stdout?.split('\n')[1]?.trim() ?? '?';
  const commit = spawnSync('git', ['-C', ROOT, 'rev-parse', '--short', 'HEAD'], { encoding: 'utf8' });
  const dirty = spawnSync('git', ['-C', ROOT, 'status', '--porcelain', '--', 'lib', 'native', 'bin'], { encoding: 'utf8' });
  return [
    `- CPUs (nproc): ${os.availableParallelism()}`,
    `- CPU model: ${model}`,
    `- memory: ${(memKiB / 1024 / 1024).toFixed(1)} GiB`,
    `- kernel: ${os.type()} ${os.release()} ${os.arch()}`,
    `- node: ${process.version}`,
    `- qemu-storage-daemon: ${firstLine('qemu-storage-daemon', ['--version'])}`,
    `- fio: ${firstLine('fio', ['--version'])}`,
    `- imgmount: ${commit.status === 0 ? commit.stdout.trim() : 'unknown commit'}${dirty.stdout?.trim() ? ' (with uncommitted changes in lib/native/bin)' : ''}`,
    `- scratch directory: ${o.dir} (${df.replace(/\s+/, ', ')})`,
    `- load average at start: ${os.loadavg().map((x) => x.toFixed(2)).join(' ')}`,
    `- date: ${new Date().toISOString().replace(/\.\d+Z$/, 'Z')}`,
  ];
}

function report(o: Options, all: ScenarioResult[], machineLines: string[], command: string, elapsed: number): string {
  const L: string[] = [];
  L.push('# Benchmarks', '');
  L.push('<!-- generated by `npm run bench` (bench/run.ts); do not edit by hand -->', '');
  L.push(`imgmount against qemu-storage-daemon's FUSE export (\`--blockdev driver=file,...,cache.direct=off\`, `
    + `\`--export type=fuse,...,writable=on\`; read-only scenarios: \`read-only=on\` on both blockdevs and \`writable=off\`, `
    + `imgmount \`-r\`) on copies of the same image. fio `
    + `with \`ioengine=libaio, direct=1\`, ${o.runtime} s time-based after a 1 s ramp, size = the whole disk. `
    + `Each run is: drop the page cache (\`sync; echo 3 > /proc/sys/vm/drop_caches\`), mount, fio, unmount. `
    + `Write-once scenarios (a fresh image per run) run an even number of rounds, at least ${WRITE_ONCE.minRounds} (a run that followed the same `
    + `side's run was often slow, on both sides: an odd count would give one side an extra slow sample), `
    + `begin with an uncounted round, delete the image right after its run, and start the next fio ${SETTLE_MS / 1000} s `
    + `after that deletion on both sides (the mount happens within that time): on this VM, memory just freed is handed `
    + `back to the hypervisor in passes for some seconds, and a run allocating meanwhile was slowed at random (several times over at worst); `
    + `a fixed pause before mounting made the side that mounts more slowly start later into that window. `
    + `${o.rounds} round(s); in each round every job runs on both sides, and which side goes first alternates per round. `
    + `Figures are medians over the rounds; ratio = median(imgmount) / median(qemu-storage-daemon) `
    + `(the same for MiB/s and IOPS, as the block size is fixed). Goal: ratio >= ${TARGET} on every job. `
    + `The images are in ${o.dir}${o.dir === '/dev/shm' ? ' (tmpfs: the disk of this VM throttles sustained writes, which would measure the disk rather than the data paths; `--dir` picks a disk)' : ''}.`, '');
  if (o.threads) L.push(`imgmount was mounted with \`--threads ${o.threads}\`.`, '');
  if (dropCacheFailure) L.push(`**Warning:** the page cache could not be dropped (${dropCacheFailure}); runs were not cold.`, '');
  L.push('Command:', '', '```', command, '```', '');
  L.push('## Machine', '', ...machineLines, `- load average at end: ${os.loadavg().map((x) => x.toFixed(2)).join(' ')}`,
    `- bench wall time: ${Math.round(elapsed)} s`, '');
  if (Math.max(loadAtStart, os.loadavg()[0]) > os.availableParallelism() / 2) {
    L.push(`Note: the machine was not idle (load average above nproc/2 at the start or end); other processes competed for the CPUs, `
      + 'so the figures are noisier than on an idle machine. The interleaving spreads that noise over both sides.', '');
  }
  for (const r of all) {
    L.push(`## Scenario \`${r.scenario.name}\` (${r.scenario.format})`, '', r.scenario.description + '.', '');
    if (r.skipped) { L.push(`**Skipped:** ${r.skipped}.`, ''); continue; }
    L.push('| job | imgmount | qemu-storage-daemon | ratio | goal >= 1.1 |', '|---|---:|---:|---:|:---:|');
    for (const jr of r.results) {
      const mi = median(jr.samples.imgmount.map((s) => s.mibs));
      const mq = median(jr.samples.qsd.map((s) => s.mibs));
      const ii = median(jr.samples.imgmount.map((s) => s.iops));
      const iq = median(jr.samples.qsd.map((s) => s.iops));
      const ratio = mi / mq;
      const title = r.scenario.once ? jr.job.title.replace(/ QD/, ` (whole disk once) QD`) : jr.job.title;
      L.push(`| ${title} | ${mi.toFixed(1)} MiB/s (${Math.round(ii)} IOPS) | ${mq.toFixed(1)} MiB/s (${Math.round(iq)} IOPS) `
        + `| ${ratio.toFixed(2)}x | ${ratio >= TARGET ? 'pass' : '**FAIL**'} |`);
    }
    L.push('', 'Per-round MiB/s (imgmount / qemu-storage-daemon):', '');
    for (const jr of r.results) {
      const rounds = jr.samples.imgmount.map((s, i) => `${s.mibs.toFixed(1)} / ${jr.samples.qsd[i]?.mibs.toFixed(1) ?? '-'}`);
      L.push(`- ${jr.job.name}: ${rounds.join(', ')}`);
    }
    // a slow imgmount run whose requests went to JavaScript is a data path fault, not noise
    const js = r.results.filter((jr) => jr.samples.imgmount.some((s) => s.js !== undefined));
    if (js.length) {
      L.push('', 'Requests imgmount served in JavaScript (not natively), per round:', '');
      for (const jr of js) L.push(`- ${jr.job.name}: ${jr.samples.imgmount.map((s) => s.js ?? '?').join(', ')}`);
    }
    L.push('');
  }
  const notRun = SCENARIOS.filter((s) => !all.some((r) => r.scenario === s));
  if (notRun.length) {
    L.push('## Not run', '', ...notRun.map((s) => `- \`${s.name}\`: not selected by \`--scenario\` in this invocation (${s.description}).`), '');
  }
  return L.join('\n');
}

// ---------------------------------------------------------------- main

function emergencyCleanup(): void {
  for (const c of liveChildren) { try { c.kill('SIGKILL'); } catch { /* gone */ } }
  for (const m of [...liveMounts]) { try { m.stopSync(); } catch { /* best effort */ } }
}

async function main(): Promise<number> {
  const o = parseArgs(process.argv.slice(2));
  const command = `npm run bench${process.argv.length > 2 ? ' -- ' + process.argv.slice(2).join(' ') : ''}`;
  for (const [cmd, pkg] of [['fio', 'fio'], ['qemu-storage-daemon', 'qemu-system-common'], ['qemu-img', 'qemu-utils']]) {
    if (spawnSync(cmd, ['--version'], { stdio: 'ignore' }).error) {
      process.stderr.write(`bench: ${cmd} not found (apt-get install -y ${pkg})\n`);
      return 1;
    }
  }
  if (!fs.existsSync('/dev/fuse')) { process.stderr.write('bench: /dev/fuse missing\n'); return 1; }

  let signals = 0;
  const onSignal = (sig: NodeJS.Signals): void => {
    signals++;
    if (signals === 1) {
      log(`${sig}: stopping the current run and cleaning up (again to force)`);
      aborted = sig;
      for (const c of liveChildren) { try { c.kill('SIGTERM'); } catch { /* gone */ } }
    } else {
      log(`${sig} again: forced cleanup`);
      emergencyCleanup();
      process.exit(130);
    }
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('exit', () => { if (liveMounts.size) emergencyCleanup(); });

  fs.mkdirSync(o.dir, { recursive: true });
  const base = fs.mkdtempSync(path.join(o.dir, 'imgmount-bench-'));
  const machineLines = machine(o);
  const t0 = Date.now();
  const all: ScenarioResult[] = [];
  let failed: unknown = null;
  log(`scratch directory ${base}; ${o.rounds} round(s) of ${o.runtime} s`);
  try {
    for (const sc of SCENARIOS) {
      if (o.scenarios && !o.scenarios.includes(sc.name)) continue;
      checkAbort();
      all.push(await runScenario(sc, base, o));
    }
  } catch (e) {
    failed = e;
  } finally {
    for (const m of [...liveMounts]) await m.stop();
    const left = fuseMountsUnder(base);
    if (left.length) {
      log(`error: still mounted: ${left.join(', ')}; leaving ${base} in place`);
      failed ??= new Error('mounts left behind');
    } else {
      fs.rmSync(base, { recursive: true, force: true });
    }
  }
  if (failed) {
    log(failed instanceof Aborted ? failed.message : `failed: ${failed instanceof Error ? failed.stack ?? failed.message : String(failed)}`);
    return failed instanceof Aborted ? 130 : 1;
  }
  const text = report(o, all, machineLines, command, (Date.now() - t0) / 1000);
  if (o.out) {
    fs.writeFileSync(o.out, text);
    log(`wrote ${o.out}`);
  } else {
    process.stdout.write(text);
  }
  process.stderr.write('\n' + text.split('\n').filter((l) => l.startsWith('|') || l.startsWith('## ') || l.startsWith('**')).join('\n') + '\n');
  return 0;
}

main().then((code) => { process.exitCode = code; }, (e: unknown) => {
  emergencyCleanup();
  process.stderr.write(`bench: ${e instanceof Error ? e.stack : String(e)}\n`);
  process.exitCode = 1;
});
