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

const ascii = (head: Uint8Array, at: number, s: string): boolean =>
  head.length >= at + s.length && Buffer.from(head.buffer, head.byteOffset + at, s.length).toString('latin1') === s;
const be32 = (h: Uint8Array, at: number): number => (h.length >= at + 4 ? Buffer.from(h.buffer, h.byteOffset).readUInt32BE(at) : -1);
const le32 = (h: Uint8Array, at: number): number => (h.length >= at + 4 ? Buffer.from(h.buffer, h.byteOffset).readUInt32LE(at) : -1);

/** A format we recognise but do not read yet: probing it must not fall back to raw. */
function pending(name: string, issue: number, probe: (h: Uint8Array, f: string) => number): FormatDriver {
  return {
    name,
    probe,
    async open() {
      throw new ImgError('unsupported', `${name} images are not supported yet (planned in issue ${issue})`);
    },
    async create() {
      throw new ImgError('unsupported', `creating ${name} images is not supported yet (planned in issue ${issue})`);
    },
  };
}

const QCOW_MAGIC = 0x514649fb;

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
