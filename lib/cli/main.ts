// The command line: parse, call lib/ops or lib/fuse, print, exit with SPEC's codes.
import yargs, { Argv } from 'yargs';
import createDebug from 'debug';
import { ImgError, exitCodeOf, formatError } from '../core/errors';
import { CACHE_MODES, CacheMode, OpenOptions } from '../core/graph';
import type { LockMode } from '../core/lock';
import { mergeTrees, OptionTree, parseOptionString } from '../core/options';
import { SecretStore } from '../core/secrets';
import { FORMAT_NAMES } from '../formats';
import { unmount } from '../fuse/unmount';
import { checkExitCode, checkHuman, checkImage, checkJson, checkMessages } from '../ops/check';
import { commitImage } from '../ops/commit';
import { compareImages } from '../ops/compare';
import { convertImage } from '../ops/convert';
import { createImage } from '../ops/create';
import { humanInfo, imageInfo } from '../ops/info';
import { mapHuman, mapImage, mapJson } from '../ops/map';
import { snapshotOp } from '../ops/snapshot';
import { snapshotTable } from '../ops/info';
import { mountCommand } from './mount';

type Args = Record<string, unknown>;

function asList(v: unknown): string[] {
  if (v === undefined) return [];
  return (Array.isArray(v) ? v : [v]).map(String);
}

function secretsFrom(a: Args): SecretStore {
  const s = new SecretStore();
  for (const o of asList(a.object)) s.addObject(o);
  return s;
}

function optionsFrom(a: Args): OptionTree | undefined {
  const list = asList(a.options);
  if (!list.length) return undefined;
  const t: OptionTree = {};
  for (const o of list) mergeTrees(t, parseOptionString(o));
  return t;
}

function openOpts(a: Args, fmtKey = 'format'): OpenOptions {
  return {
    format: a[fmtKey] as string | undefined,
    options: optionsFrom(a),
    imageOpts: !!a['image-opts'],
    secrets: secretsFrom(a),
    locking: (a.locking as LockMode | undefined) ?? 'auto',
    shareRw: !!a['force-share'],
  };
}

const out = (s: string): void => { process.stdout.write(s.endsWith('\n') ? s : `${s}\n`); };

let exitCode = 0;

const common = (y: Argv): Argv => y
  .option('object', { type: 'string', requiresArg: true, describe: 'secret,id=ID,data=..|file=..[,format=raw|base64]' })
  .option('image-opts', { type: 'boolean', describe: 'treat the image argument as an option string' })
  .option('U', { alias: 'force-share', type: 'boolean', describe: 'open without refusing to share (like qemu-img -U)' });

const fmtOpt = (y: Argv): Argv => y.option('f', { alias: 'format', type: 'string', describe: `image format (${FORMAT_NAMES.join(', ')}); probed when omitted` });

export function buildParser(argv: string[]): Argv {
  return yargs(argv)
    .scriptName('imgmount')
    .usage('$0 <command> [options]')
    .option('debug', { type: 'boolean', describe: 'verbose logging (same as DEBUG=imgmount:*)', global: true })
    .middleware((a) => {
      if (a.debug) createDebug.enable('imgmount:*');
    })
    .command('mount <image> <mountpoint>', 'expose an image as <mountpoint>/disk.raw', (y) => common(fmtOpt(y))
      .positional('image', { type: 'string', describe: 'path, json:{...}, fat:... or option string with --image-opts' })
      .positional('mountpoint', { type: 'string' })
      .option('o', { alias: 'options', type: 'string', requiresArg: true, describe: 'driver options K=V,... (dotted for children)' })
      .option('r', { alias: 'read-only', type: 'boolean', describe: 'expose read-only' })
      .option('s', { alias: 'snapshot', type: 'boolean', describe: 'write to a temporary overlay; the image is never modified' })
      .option('l', { alias: 'load-snapshot', type: 'string', describe: 'expose internal snapshot ID or TAG (read-only)' })
      .option('locking', { choices: ['on', 'off', 'auto'], default: 'auto', describe: 'image locking' })
      .option('share-rw', { type: 'boolean', describe: 'allow other writers (share-rw=on)' })
      .option('cache', { choices: CACHE_MODES, default: 'writeback', describe: 'cache mode' })
      .option('allow-other', { type: 'boolean', describe: 'FUSE allow_other' })
      .option('foreground', { type: 'boolean', describe: 'stay attached; SIGINT/SIGTERM unmount' })
      .option('threads', { type: 'number', hidden: true }),
    async (a: Args) => {
      const secrets = secretsFrom(a);
      exitCode = await mountCommand({
        image: String(a.image),
        format: a.format as string | undefined,
        options: optionsFrom(a),
        imageOpts: !!a['image-opts'],
        secrets: secrets.toJSON(),
        mountpoint: String(a.mountpoint),
        createdMountpoint: false,
        readOnly: !!a['read-only'],
        snapshot: !!a.snapshot,
        loadSnapshot: a['load-snapshot'] as string | undefined,
        locking: a.locking as LockMode,
        shareRw: !!a['share-rw'] || !!a['force-share'],
        cache: a.cache as CacheMode,
        allowOther: !!a['allow-other'],
        threads: a.threads as number | undefined,
      }, !!a.foreground, !!a.debug);
    })
    .command(['unmount <mountpoint>', 'umount <mountpoint>'], 'flush, unmount and wait for the server to exit', (y) => y
      .positional('mountpoint', { type: 'string' })
      .option('force', { type: 'boolean', describe: 'unmount even when files are open (lazy detach)' }),
    async (a: Args) => { await unmount(String(a.mountpoint), !!a.force); })
    .command('create <file> [size]', 'create an image', (y) => common(y)
      .positional('file', { type: 'string' })
      .positional('size', { type: 'string', describe: 'bytes, or with k, M, G, T, P, E suffix' })
      .option('f', { alias: 'format', type: 'string', demandOption: true, describe: 'image format' })
      .option('o', { alias: 'options', type: 'string', requiresArg: true, describe: 'format options K=V,...' })
      .option('b', { alias: 'backing', type: 'string', describe: 'backing file' })
      .option('F', { alias: 'backing-format', type: 'string', describe: 'backing file format' })
      .option('q', { alias: 'quiet', type: 'boolean' }),
    async (a: Args) => {
      await createImage({
        format: String(a.format), filename: String(a.file), size: a.size as string | undefined, options: optionsFrom(a),
        backing: a.backing as string | undefined, backingFormat: a['backing-format'] as string | undefined, secrets: secretsFrom(a),
      });
    })
    .command('info <file>', 'show image information', (y) => common(fmtOpt(y))
      .positional('file', { type: 'string' })
      .option('output', { choices: ['human', 'json'], default: 'human' })
      .option('backing-chain', { type: 'boolean' }),
    async (a: Args) => {
      const infos = await imageInfo(String(a.file), openOpts(a), !!a['backing-chain']);
      if (a.output === 'json') out(JSON.stringify(a['backing-chain'] ? infos : infos[0], null, 4));
      else out(infos.map(humanInfo).join('\n\n'));
    })
    .command('check <file>', 'check an image for consistency', (y) => common(fmtOpt(y))
      .positional('file', { type: 'string' })
      .option('output', { choices: ['human', 'json'], default: 'human' })
      .option('r', { alias: 'repair', choices: ['leaks', 'all'] })
      .option('q', { alias: 'quiet', type: 'boolean' }),
    async (a: Args) => {
      const rep = await checkImage(String(a.file), openOpts(a), (a.repair as 'leaks' | 'all' | undefined) ?? 'none');
      if (!rep.result) {
        process.stderr.write('imgmount: check: This image format does not support checks\n');
        exitCode = 63;
        return;
      }
      for (const m of checkMessages(rep)) process.stderr.write(`${m}\n`);
      if (a.output === 'json') out(JSON.stringify(checkJson(rep), null, 4));
      else if (!a.quiet) out(checkHuman(rep));
      exitCode = checkExitCode(rep.result);
    })
    .command('map <file>', 'show the allocation map', (y) => common(fmtOpt(y))
      .positional('file', { type: 'string' })
      .option('output', { choices: ['human', 'json'], default: 'human' }),
    async (a: Args) => {
      const entries = await mapImage(String(a.file), openOpts(a));
      out(a.output === 'json' ? mapJson(entries) : mapHuman(entries));
    })
    .command('compare <file1> <file2>', 'compare the guest contents of two images', (y) => common(y)
      .positional('file1', { type: 'string' })
      .positional('file2', { type: 'string' })
      .option('f', { type: 'string', describe: 'format of file1' })
      .option('F', { type: 'string', describe: 'format of file2' })
      .option('s', { alias: 'strict', type: 'boolean', describe: 'sizes must match and allocation too' })
      .option('p', { alias: 'progress', type: 'boolean' })
      .option('q', { alias: 'quiet', type: 'boolean' }),
    async (a: Args) => {
      try {
        const base = openOpts(a);
        const r = await compareImages(String(a.file1), String(a.file2), { ...base, format: a.f as string | undefined },
          { ...base, format: a.F as string | undefined }, !!a.strict, !!a.progress);
        if (!a.quiet) out(r.message);
        exitCode = r.identical ? 0 : 1;
      } catch (e) {
        // qemu-img compare: 2 for errors
        process.stderr.write(`${formatError(e)}\n`);
        exitCode = 2;
      }
    })
    .command('snapshot <file>', 'list, create, apply or delete internal snapshots', (y) => common(fmtOpt(y))
      .positional('file', { type: 'string' })
      .option('l', { alias: 'list', type: 'boolean' })
      .option('c', { alias: 'create', type: 'string' })
      .option('a', { alias: 'apply', type: 'string' })
      .option('d', { alias: 'delete', type: 'string' })
      .check((a) => {
        const n = ['list', 'create', 'apply', 'delete'].filter((k) => a[k] !== undefined && a[k] !== false).length;
        if (n !== 1) throw new Error('exactly one of -l, -c, -a, -d is required');
        return true;
      }),
    async (a: Args) => {
      const action = a.list ? { op: 'list' as const } : a.create !== undefined ? { op: 'create' as const, tag: String(a.create) }
        : a.apply !== undefined ? { op: 'apply' as const, tag: String(a.apply) } : { op: 'delete' as const, tag: String(a.delete) };
      const snaps = await snapshotOp(String(a.file), openOpts(a), action);
      if (snaps) {
        out('Snapshot list:');
        out(snapshotTable(snaps));
      }
    })
    .command('commit <target>', 'commit an image (or a -s mount) into its backing file', (y) => common(fmtOpt(y))
      .positional('target', { type: 'string', describe: 'image file, or the mountpoint of a -s mount' })
      .option('d', { type: 'boolean', describe: 'keep the image content after commit' })
      .option('p', { alias: 'progress', type: 'boolean' }),
    async (a: Args) => {
      const { commitTarget } = await import('./commit-target');
      await commitTarget(String(a.target), openOpts(a), !!a.d, !!a.progress, commitImage);
      out('Image committed.');
    })
    .command('convert <src> <dst>', 'convert an image to another format', (y) => common(fmtOpt(y))
      .positional('src', { type: 'string' })
      .positional('dst', { type: 'string' })
      .option('O', { type: 'string', default: 'raw', describe: 'output format' })
      .option('o', { alias: 'options', type: 'string', requiresArg: true, describe: 'output format options' })
      .option('c', { type: 'boolean', describe: 'compress the output' })
      .option('p', { alias: 'progress', type: 'boolean' })
      .option('S', { type: 'string', describe: 'sparse size (0 = no zero detection)' }),
    async (a: Args) => {
      const src = openOpts(a);
      delete src.options;
      await convertImage({
        src: String(a.src), srcOpen: src, dst: String(a.dst), outFormat: String(a.O), outOptions: optionsFrom(a),
        compressed: !!a.c, progress: !!a.progress || (process.stderr.isTTY && !!a.p), secrets: src.secrets,
        noSparse: a.S === '0',
      });
    })
    .demandCommand(1, 'a command is required (see --help)')
    .strict()
    .recommendCommands()
    .help()
    .alias('h', 'help')
    .version()
    .wrap(Math.min(110, process.stdout.columns || 100))
    .fail((msg, err) => {
      if (err) throw err;
      throw new ImgError('usage', `${msg.split('\n')[0]} (see --help)`);
    });
}

export async function main(argv: string[]): Promise<number> {
  exitCode = 0;
  try {
    await buildParser(argv).parseAsync();
    return exitCode;
  } catch (e) {
    process.stderr.write(`${formatError(e)}\n`);
    createDebug('imgmount:cli')('%O', e);
    return exitCodeOf(e);
  }
}

if (require.main === module) {
  process.env.UV_THREADPOOL_SIZE ??= '16';
  void main(process.argv.slice(2)).then((code) => { process.exitCode = code; });
}
