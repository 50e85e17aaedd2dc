// FAT directory entry encoding: 8.3 short names with numeric tails, VFAT long names
// (UTF-16LE, 13 characters per slot, checksum over the short name) and DOS timestamps.

export const ATTR_RO = 0x01;
export const ATTR_HIDDEN = 0x02;
export const ATTR_SYSTEM = 0x04;
export const ATTR_VOLUME = 0x08;
export const ATTR_DIR = 0x10;
export const ATTR_ARCHIVE = 0x20;
export const ATTR_LFN = 0x0f;

/** characters allowed in a short name besides A-Z and 0-9 */
const SHORT_SPECIAL = new Set("$%'-_@~`!(){}^#&".split(''));
/** characters VFAT forbids in long names (besides control characters) */
const LONG_FORBIDDEN = new Set('"*/:<>?\\|'.split(''));

export const MAX_LFN = 255;

/** true when a host name can be a VFAT long name */
export function validLongName(name: string): boolean {
  if (name.length === 0 || name === '.' || name === '..') return false;
  let units = 0;
  for (const ch of name) {
    const c = ch.codePointAt(0)!;
    if (c < 0x20 || c === 0x7f || LONG_FORBIDDEN.has(ch)) return false;
    units += c > 0xffff ? 2 : 1;
  }
  return units <= MAX_LFN;
}

function shortChar(ch: string): boolean {
  return /^[A-Z0-9]$/.test(ch) || SHORT_SPECIAL.has(ch);
}

/** the 11-byte short name if `name` is a valid 8.3 name as it is (upper case), else null */
export function exactShortName(name: string): string | null {
  if (name === '.' || name === '..') return null;
  const dot = name.indexOf('.');
  const base = dot < 0 ? name : name.slice(0, dot);
  const ext = dot < 0 ? '' : name.slice(dot + 1);
  if (dot >= 0 && (ext.length === 0 || ext.includes('.'))) return null;
  if (base.length < 1 || base.length > 8 || ext.length > 3) return null;
  for (const ch of base + ext) if (!shortChar(ch)) return null;
  return base.padEnd(8, ' ') + ext.padEnd(3, ' ');
}

/** basis of a generated short name (Windows rules, simplified): upper case, invalid -> '_' */
function basis(name: string): { base: string; ext: string; lossy: boolean } {
  let lossy = false;
  const conv = (s: string): string => {
    let out = '';
    for (const ch of s.toUpperCase()) {
      if (ch === ' ' || ch === '.') { lossy = true; continue; }
      if (shortChar(ch)) out += ch;
      else { out += '_'; lossy = true; }
    }
    return out;
  };
  const stripped = name.replace(/^\.+/, '');
  if (stripped !== name) lossy = true;
  const dot = stripped.lastIndexOf('.');
  let base = conv(dot < 0 ? stripped : stripped.slice(0, dot));
  let ext = conv(dot < 0 ? '' : stripped.slice(dot + 1));
  if (base.length > 8) lossy = true;
  if (ext.length > 3) { lossy = true; ext = ext.slice(0, 3); }
  if (!base) { base = '_'; lossy = true; }
  return { base, ext, lossy };
}

/** Assigns unique short names in one directory. Exact 8.3 names are taken first so a
 *  generated name with a tail never steals one. Returns 11-byte names (as latin1 strings). */
export function assignShortNames(names: string[]): string[] {
  const used = new Set<string>(['.          ', '..         ']);
  const out: string[] = new Array(names.length);
  const nextTail = new Map<string, number>();
  names.forEach((n, i) => {
    const s = exactShortName(n);
    if (s && !used.has(s)) { used.add(s); out[i] = s; }
  });
  names.forEach((n, i) => {
    if (out[i]) return;
    const { base, ext, lossy } = basis(n);
    if (!lossy) {
      const s = base.padEnd(8, ' ') + ext.padEnd(3, ' ');
      if (!used.has(s)) { used.add(s); out[i] = s; return; }
    }
    const key = base.slice(0, 6) + '.' + ext;
    for (let k = nextTail.get(key) ?? 1; ; k++) {
      const tail = `~${k}`;
      const b = base.slice(0, 8 - tail.length) + tail;
      const s = b.padEnd(8, ' ') + ext.padEnd(3, ' ');
      if (!used.has(s)) { used.add(s); out[i] = s; nextTail.set(key, k + 1); break; }
      if (k > 999999) throw new Error('no free short name');
    }
  });
  return out;
}

export function lfnChecksum(short: Uint8Array | string, off = 0): number {
  let sum = 0;
  for (let i = 0; i < 11; i++) {
    const c = typeof short === 'string' ? short.charCodeAt(i) : short[off + i];
    sum = (((sum & 1) << 7) | (sum >> 1)) + c;
    sum &= 0xff;
  }
  return sum;
}

/** byte offsets of the 13 UTF-16 characters inside a long-name slot */
export const LFN_OFFSETS = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];

/** number of 32-byte slots a long name needs */
export function lfnSlots(name: string): number {
  return Math.ceil(utf16Units(name).length / 13);
}

function utf16Units(name: string): number[] {
  const u: number[] = [];
  for (let i = 0; i < name.length; i++) u.push(name.charCodeAt(i));
  return u;
}

/** writes the long-name slots (last slot first, as on disk) at buf[off..] */
export function writeLfn(buf: Uint8Array, off: number, name: string, checksum: number): number {
  const units = utf16Units(name);
  const n = Math.ceil(units.length / 13);
  for (let s = 0; s < n; s++) {
    const seq = n - s; // on disk the highest ordinal comes first
    const p = off + s * 32;
    buf[p] = seq | (s === 0 ? 0x40 : 0);
    buf[p + 11] = ATTR_LFN;
    buf[p + 12] = 0;
    buf[p + 13] = checksum;
    buf[p + 26] = 0; buf[p + 27] = 0;
    for (let k = 0; k < 13; k++) {
      const idx = (seq - 1) * 13 + k;
      const v = idx < units.length ? units[idx] : idx === units.length ? 0 : 0xffff;
      buf[p + LFN_OFFSETS[k]] = v & 0xff;
      buf[p + LFN_OFFSETS[k] + 1] = v >> 8;
    }
  }
  return n * 32;
}

/** DOS date and time (local time, as qemu) with 10 ms resolution byte; clamped to 1980..2107 */
export function dosTime(ms: number): { date: number; time: number; tenths: number } {
  const d = new Date(ms);
  let y = d.getFullYear();
  if (!Number.isFinite(y) || y < 1980) return { date: (1 << 5) | 1, time: 0, tenths: 0 };
  if (y > 2107) { y = 2107; return { date: ((y - 1980) << 9) | (12 << 5) | 31, time: (23 << 11) | (59 << 5) | 29, tenths: 199 }; }
  const date = ((y - 1980) << 9) | ((d.getMonth() + 1) << 5) | d.getDate();
  const time = (d.getHours() << 11) | (d.getMinutes() << 5) | (d.getSeconds() >> 1);
  const tenths = (d.getSeconds() & 1) * 100 + Math.floor(d.getMilliseconds() / 10);
  return { date, time, tenths };
}

/** milliseconds since the epoch of a DOS date/time (local time); null for an invalid date */
export function fromDosTime(date: number, time: number, tenths = 0): number | null {
  const day = date & 31;
  const mon = (date >> 5) & 15;
  const year = 1980 + (date >> 9);
  if (day < 1 || mon < 1 || mon > 12) return null;
  const sec = (time & 31) * 2;
  const min = (time >> 5) & 63;
  const hour = time >> 11;
  if (sec > 59 || min > 59 || hour > 23) return null;
  return new Date(year, mon - 1, day, hour, min, sec, Math.min(tenths, 199) * 10).getTime();
}

export interface DirEntryInput {
  short: string; // 11 chars, latin1
  attr: number;
  cluster: number;
  size: number;
  mtimeMs: number;
  atimeMs: number;
  ctimeMs: number;
}

export function writeShortEntry(buf: Uint8Array, p: number, e: DirEntryInput): void {
  for (let i = 0; i < 11; i++) buf[p + i] = e.short.charCodeAt(i) & 0xff;
  if (buf[p] === 0xe5) buf[p] = 0x05;
  buf[p + 11] = e.attr;
  buf[p + 12] = 0;
  const c = dosTime(e.ctimeMs);
  const m = dosTime(e.mtimeMs);
  const a = dosTime(e.atimeMs);
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  buf[p + 13] = c.tenths;
  dv.setUint16(p + 14, c.time, true);
  dv.setUint16(p + 16, c.date, true);
  dv.setUint16(p + 18, a.date, true);
  dv.setUint16(p + 20, (e.cluster >>> 16) & 0xffff, true);
  dv.setUint16(p + 22, m.time, true);
  dv.setUint16(p + 24, m.date, true);
  dv.setUint16(p + 26, e.cluster & 0xffff, true);
  dv.setUint32(p + 28, e.size >>> 0, true);
}
