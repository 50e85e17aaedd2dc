// The format registry. Adding a format is adding its folder and one line here.
import { ImgError } from '../core/errors';
import type { FormatDriver } from '../core/node';
import { rawDriver } from './raw';
import { qcow2Driver } from './qcow2';
import { parallelsDriver } from './parallels';
import { qcowDriver } from './qcow';
import { vdiDriver } from './vdi';
import { vmdkDriver } from './vmdk';
import { vpcDriver } from './vpc';
import { vhdxDriver } from './vhdx';
import { qedDriver } from './qed';
import { luksDriver } from './luks';
import { dmgDriver } from './dmg';
import { cloopDriver } from './cloop';
import { bochsDriver } from './bochs';

export const drivers: FormatDriver[] = [
  rawDriver,
  qcow2Driver,
  qcowDriver,
  qedDriver,
  vdiDriver,
  vmdkDriver,
  vpcDriver,
  vhdxDriver,
  parallelsDriver,
  luksDriver,
  bochsDriver,
  cloopDriver,
  dmgDriver,
];

export function registerDriver(d: FormatDriver): void {
  const i = drivers.findIndex((x) => x.name === d.name);
  if (i >= 0) drivers[i] = d;
  else drivers.push(d);
}

export function findDriver(name: string): FormatDriver {
  const d = drivers.find((x) => x.name === name);
  if (!d) throw new ImgError('usage', `Unknown driver '${name}'`);
  return d;
}

/** The best-scoring format for the head of a file; raw when nothing matches. */
export const PROBE_TAIL = 4096;

export function probeFormat(head: Uint8Array, filename: string, tail?: Uint8Array, fileSize = 0): FormatDriver {
  let best = rawDriver;
  let score = 0;
  for (const d of drivers) {
    if (d === rawDriver) continue;
    let s = d.probe ? d.probe(head, filename) : 0;
    if (tail && d.probeTail) s = Math.max(s, d.probeTail(tail, fileSize));
    if (s > score) { score = s; best = d; }
  }
  return best;
}

export const FORMAT_NAMES = ['raw', 'qcow2', 'qcow', 'qed', 'vdi', 'vmdk', 'vpc', 'vhdx', 'luks', 'parallels', 'bochs', 'cloop', 'dmg'];
