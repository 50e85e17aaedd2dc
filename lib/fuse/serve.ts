// The mount server: opens the image graph, exports it through FUSE, and shuts down cleanly
// when the kernel unmounts it (unmount, fusermount3 -u) or on SIGINT/SIGTERM.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import createDebug from 'debug';
import { ImgError } from '../core/errors';
import { CacheMode, openImage, OpenOptions } from '../core/graph';
import type { LockMode } from '../core/lock';
import { loadNative, MNT_DETACH } from '../core/native';
import type { BlockNode } from '../core/node';
import type { OptionTree } from '../core/options';
import { SecretStore } from '../core/secrets';
import { ExportFile, FuseExport } from './export';
import { removeState, writeState } from './runtime';
import { startControl, stopControl } from './control';
import { openSnapshotMode, SnapshotMode } from './overlay';
import { vvfatRwRequested } from '../synth/vvfat';

const debug = createDebug('imgmount:serve');

export interface ServeConfig {
  image: string;
  format?: string;
  options?: OptionTree;
  imageOpts?: boolean;
  secrets: ReturnType<SecretStore['toJSON']>;
  mountpoint: string;
  createdMountpoint: boolean;
  readOnly: boolean;
  snapshot: boolean;
  loadSnapshot?: string;
  locking: LockMode;
  shareRw: boolean;
  cache: CacheMode;
  allowOther: boolean;
  threads?: number;
}

/** Safe file name for a snapshot tag (no '/', no leading dot). */
export function snapshotFileName(tag: string): string {
  return `${tag.replace(/[/\0]/g, '_').replace(/^\.+/, '_') || '_'}.raw`;
}

interface Built { files: ExportFile[]; nodes: BlockNode[]; snapshotMode: SnapshotMode | null }

async function buildFiles(cfg: ServeConfig, secrets: SecretStore): Promise<Built> {
  const openOpts: OpenOptions = {
    format: cfg.format, options: cfg.options, imageOpts: cfg.imageOpts,
    secrets, locking: cfg.locking, shareRw: cfg.shareRw, cache: cfg.cache,
  };
  if (cfg.snapshot) {
    if (cfg.loadSnapshot !== undefined) throw new ImgError('usage', '-s and -l cannot be combined');
    if (cfg.readOnly) throw new ImgError('usage', '-s and -r cannot be combined');
    if (vvfatRwRequested(cfg.image, { imageOpts: cfg.imageOpts, options: cfg.options, format: cfg.format })) {
      // as the QEMU docs advise: changes would go to the overlay and never reach the directory
      throw new ImgError('usage', '-s cannot be combined with a writable virtual FAT disk (rw:)');
    }
    const sm = await openSnapshotMode(cfg.image, openOpts);
    return { files: [{ path: 'disk.raw', node: sm.top, readOnly: false }], nodes: [sm.top], snapshotMode: sm };
  }
  const readOnly = cfg.readOnly || cfg.loadSnapshot !== undefined;
  const node = await openImage(cfg.image, { ...openOpts, readOnly });
  const nodes: BlockNode[] = [node];
  const files: ExportFile[] = [];
  try {
    if (cfg.loadSnapshot !== undefined) {
      if (!node.openSnapshot) throw new ImgError('unsupported', `${cfg.image}: the ${node.driver} format has no internal snapshots`);
      const snap = await node.openSnapshot(cfg.loadSnapshot);
      nodes.push(snap);
      files.push({ path: 'disk.raw', node: snap, readOnly: true });
    } else {
      files.push({ path: 'disk.raw', node, readOnly: node.readOnly });
    }
    if (node.snapshots && node.openSnapshot) {
      const seen = new Set<string>();
      for (const s of await node.snapshots()) {
        let name = snapshotFileName(s.name || s.id);
        if (seen.has(name)) name = snapshotFileName(`${s.name}-${s.id}`);
        seen.add(name);
        const sn = await node.openSnapshot(s.id);
        nodes.push(sn);
        files.push({ path: `snapshots/${name}`, node: sn, readOnly: true });
      }
    }
  } catch (e) {
    for (const n of nodes.reverse()) await n.close().catch(() => undefined);
    throw e;
  }
  return { files, nodes, snapshotMode: null };
}

/** Kernel-side unmount of our own mountpoint (root: umount2; else fusermount3 -u). */
export async function kernelUnmount(mountpoint: string, lazy: boolean): Promise<number> {
  const nat = loadNative();
  if (process.getuid?.() === 0 && nat) {
    let err = nat.umount(mountpoint, lazy ? MNT_DETACH : 0);
    if (err === 16 /* EBUSY */ && lazy) err = nat.umount(mountpoint, MNT_DETACH);
    return err;
  }
  return new Promise((resolve) => {
    const p = spawn('fusermount3', lazy ? ['-u', '-z', '--', mountpoint] : ['-u', '--', mountpoint], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    p.stderr.on('data', (d: Buffer) => { err += d.toString(); });
    p.on('error', () => resolve(2));
    p.on('exit', (code) => resolve(code === 0 ? 0 : /busy/i.test(err) ? 16 : 5));
  });
}

/**
 * Runs a server until it is unmounted. `ready` is called once disk.raw is usable (or with
 * the error that prevented it); the promise resolves with the exit code.
 */
export async function serve(cfg: ServeConfig, ready: (err: Error | null, notice?: string) => void): Promise<number> {
  const secrets = SecretStore.fromJSON(cfg.secrets);
  let built: Built;
  try {
    built = await buildFiles(cfg, secrets);
  } catch (e) {
    ready(e as Error);
    return 1;
  }
  const exp = new FuseExport(built.files, {
    mountpoint: cfg.mountpoint,
    allowOther: cfg.allowOther,
    fsname: `imgmount:${cfg.image.startsWith('json:') ? 'json' : cfg.image}`.slice(0, 200).replace(/[,\s]/g, '_'),
    threads: cfg.threads,
  });
  const closeNodes = async (): Promise<void> => {
    for (const n of [...built.nodes].reverse()) {
      try { await n.flush?.(); } catch (e) { debug('flush: %s', (e as Error).message); }
      await n.close().catch((e) => debug('close: %s', (e as Error).message));
    }
  };
  try {
    await exp.start();
  } catch (e) {
    await closeNodes();
    ready(e as Error);
    return 1;
  }
  writeState({ pid: process.pid, mountpoint: cfg.mountpoint, image: cfg.image.startsWith('json:') ? 'json:...' : cfg.image, createdMountpoint: cfg.createdMountpoint, started: Date.now() });
  const control = startControl(cfg.mountpoint, async (req) => {
    if (req.op === 'ping') return;
    if (req.op === 'commit') {
      const sm = built.snapshotMode;
      if (!sm) throw new ImgError('usage', `${cfg.mountpoint} is not mounted in snapshot mode (-s): nothing to commit`);
      await exp.exclusive(() => sm.commit());
      return;
    }
    throw new ImgError('usage', 'unknown control request');
  });
  let stopping = false;
  const onSignal = (): void => {
    if (stopping) return;
    stopping = true;
    debug('signal: unmounting %s', cfg.mountpoint);
    void kernelUnmount(cfg.mountpoint, false).then(async (err) => {
      if (err) {
        // busy: detach it so no new users come, then stop serving the old ones
        await kernelUnmount(cfg.mountpoint, true);
        await exp.stop();
      }
    }).catch((e) => debug('signal unmount: %s', (e as Error).message));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('SIGHUP', onSignal);
  const top = built.files[0];
  const notice = !cfg.readOnly && top.readOnly && cfg.loadSnapshot === undefined
    ? (top.node.driver === 'vvfat'
      ? `imgmount: notice: ${cfg.image}: the virtual FAT disk is read-only (fat:rw:DIR makes it writable)`
      : `imgmount: notice: ${cfg.image}: the ${top.node.driver} format is read-only here; disk.raw is read-only`)
    : undefined;
  ready(null, notice);
  const err = await exp.wait();
  debug('server threads stopped (%d)', err);
  await exp.stop();
  await closeNodes();
  stopControl(control, cfg.mountpoint);
  removeState(cfg.mountpoint, process.pid);
  if (cfg.createdMountpoint) {
    try { fs.rmdirSync(cfg.mountpoint); } catch { /* still mounted or not empty */ }
  }
  process.off('SIGINT', onSignal);
  process.off('SIGTERM', onSignal);
  process.off('SIGHUP', onSignal);
  return 0;
}
