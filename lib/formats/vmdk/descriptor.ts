// VMDK text descriptor: parse (createType, CID, parentCID, parentFileNameHint, extent lines)
// and generate it as qemu's vmdk_co_do_create does.
import path from 'node:path';
import { ImgError } from '../../core/errors';

export const MAX_DESC_BYTES = (1 << 20) - 1; // qemu reads at most 1 MiB - 1 of descriptor
export const EXTENT_TYPES = ['FLAT', 'SPARSE', 'VMFS', 'VMFSSPARSE', 'SESPARSE', 'ZERO'] as const;
export type ExtentType = typeof EXTENT_TYPES[number];

export interface ExtentLine {
  access: string;
  sectors: number;
  type: ExtentType;
  filename: string;
  /** FLAT: start sector in the file */
  flatOffset: number;
}

export interface Descriptor {
  text: string;
  createType: string | null;
  cid: number | null;
  parentCid: number | null;
  parentHint: string | null;
  extents: ExtentLine[];
}

const MAX_SECTORS = 2 ** 52 / 512;

/** the value of `name="..."` (qemu's vmdk_parse_description: first occurrence anywhere) */
function quoted(text: string, name: string): string | null {
  const i = text.indexOf(name);
  if (i < 0) return null;
  const start = i + name.length + 2;
  if (start > text.length) return null;
  const end = text.indexOf('"', start);
  if (end < 0) return null;
  return text.slice(start, end);
}

/** qemu's vmdk_read_cid: "CID" / "parentCID" anywhere, then '=' and hex */
function readCid(text: string, name: string): number | null {
  const i = text.indexOf(name);
  if (i < 0) return null;
  const m = /^\s*([0-9a-fA-F]+)/.exec(text.slice(i + name.length + 1, i + name.length + 40));
  if (!m) return null;
  return Number.parseInt(m[1].slice(-8), 16) >>> 0;
}

export function parseDescriptor(raw: Buffer | string, what: string): Descriptor {
  let text = typeof raw === 'string' ? raw : raw.toString('latin1');
  const nul = text.indexOf('\0');
  if (nul >= 0) text = text.slice(0, nul);
  const extents: ExtentLine[] = [];
  for (const line0 of text.split('\n')) {
    const line = line0.replace(/\r$/, '').trim();
    const z = /^(RW|RDONLY)\s+(\d+)\s+ZERO\s*$/.exec(line);
    if (z) {
      const n = Number(z[2]);
      if (!Number.isSafeInteger(n) || n <= 0 || n > MAX_SECTORS) throw new ImgError('image', `${what}: invalid extent size ${z[2].slice(0, 24)}`);
      extents.push({ access: z[1], sectors: n, type: 'ZERO', filename: '', flatOffset: 0 });
      continue;
    }
    // RW <sectors> <TYPE> "<file>" [offset]
    const m = /^(\S{1,10})\s+(-?\d+)\s+(\S{1,10})\s+"([^"\r\n]{0,511})"(?:\s+(-?\d+))?/.exec(line);
    if (!m) continue;
    const access = m[1];
    if (!['RW', 'RDONLY', 'NOACCESS'].includes(access)) continue;
    const type = m[3] as ExtentType;
    const hasOffset = m[5] !== undefined;
    const sectors = Number(m[2]);
    let flatOffset = 0;
    if (type === 'FLAT') {
      if (!hasOffset || Number(m[5]) < 0) throw new ImgError('image', `${what}: invalid extent line: ${line.slice(0, 120)}`);
      flatOffset = Number(m[5]);
    } else if (hasOffset) {
      throw new ImgError('image', `${what}: invalid extent line: ${line.slice(0, 120)}`);
    }
    if (!EXTENT_TYPES.includes(type)) throw new ImgError('image', `${what}: unsupported extent type '${type.slice(0, 16)}'`);
    if (!Number.isSafeInteger(sectors) || sectors <= 0 || sectors > MAX_SECTORS) {
      throw new ImgError('image', `${what}: invalid extent size ${m[2].slice(0, 24)}`);
    }
    if (!Number.isSafeInteger(flatOffset) || flatOffset > MAX_SECTORS) throw new ImgError('image', `${what}: invalid extent offset`);
    if (access === 'NOACCESS') throw new ImgError('unsupported', `${what}: NOACCESS extents are not supported`);
    extents.push({ access, sectors, type, filename: m[4], flatOffset });
  }
  return {
    text,
    createType: quoted(text, 'createType'),
    cid: readCid(text, 'CID'),
    parentCid: readCid(text, 'parentCID'),
    parentHint: quoted(text, 'parentFileNameHint'),
    extents,
  };
}

/** descriptor text with a new CID (qemu's vmdk_write_cid keeps everything from parentCID on) */
export function replaceCid(text: string, cid: number): string {
  return text.replace(/(^|\n)CID=[0-9a-fA-F]*/, `$1CID=${cid.toString(16).padStart(8, '0')}`);
}

/** an extent name must stay inside the descriptor's directory unless the user allows otherwise */
export function checkExtentPath(name: string, allowExternal: boolean, what: string): void {
  if (allowExternal) return;
  if (name === '' || path.isAbsolute(name) || name.split(/[\\/]/).includes('..') || /^[a-z+]+:/i.test(name)) {
    throw new ImgError('image', `${what}: extent file '${name.slice(0, 200)}' is outside the descriptor's directory (use x-allow-external-extents=on to allow it)`);
  }
}

export interface DescriptorParams {
  cid: number;
  parentCid: number;
  createType: string;
  parentHint: string | null;
  extentLines: string[];
  hwVersion: string;
  size: number;
  adapterType: string;
  toolsVersion: string;
}

export function buildDescriptor(p: DescriptorParams): string {
  const heads = p.adapterType === 'ide' ? 16 : 255;
  const cyl = Math.floor(p.size / (63 * heads * 512));
  return '# Disk DescriptorFile\n'
    + 'version=1\n'
    + `CID=${p.cid.toString(16)}\n`
    + `parentCID=${p.parentCid.toString(16)}\n`
    + `createType="${p.createType}"\n`
    + (p.parentHint !== null ? `parentFileNameHint="${p.parentHint}"` : '')
    + '\n'
    + '# Extent description\n'
    + p.extentLines.join('')
    + '\n'
    + '# The Disk Data Base\n'
    + '#DDB\n'
    + '\n'
    + `ddb.virtualHWVersion = "${p.hwVersion}"\n`
    + `ddb.geometry.cylinders = "${cyl}"\n`
    + `ddb.geometry.heads = "${heads}"\n`
    + 'ddb.geometry.sectors = "63"\n'
    + `ddb.adapterType = "${p.adapterType}"\n`
    + `ddb.toolsVersion = "${p.toolsVersion}"\n`;
}
