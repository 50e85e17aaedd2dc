// A small, bounded parser for the XML property-list subset UDIF images use: dict, key, array,
// data (base64), string, integer, true/false, real, date. No DTD processing, no external
// entities; only the five predefined entities and numeric character references.
import { ImgError } from '../../core/errors';

export type PlistValue = string | number | boolean | Buffer | PlistValue[] | PlistDict;
export interface PlistDict { [key: string]: PlistValue }

const MAX_DEPTH = 32;
const MAX_NODES = 1_000_000;

function bad(msg: string): never { throw new ImgError('image', `dmg: malformed property list: ${msg}`); }

function decodeEntities(s: string): string {
  if (!s.includes('&')) return s;
  return s.replace(/&(#x[0-9a-fA-F]{1,6}|#[0-9]{1,7}|lt|gt|amp|quot|apos);/g, (_m, e: string) => {
    if (e === 'lt') return '<';
    if (e === 'gt') return '>';
    if (e === 'amp') return '&';
    if (e === 'quot') return '"';
    if (e === 'apos') return "'";
    const cp = e[1] === 'x' ? parseInt(e.slice(2), 16) : parseInt(e.slice(1), 10);
    if (cp > 0x10ffff) bad('bad character reference');
    return String.fromCodePoint(cp);
  });
}

function decodeBase64(s: string): Buffer {
  const clean = s.replace(/[\s]/g, '');
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(clean)) bad('invalid base64 in <data>');
  return Buffer.from(clean, 'base64');
}

interface Tag { name: string; close: boolean; selfClose: boolean; end: number }

export function parsePlist(text: string): PlistValue {
  let pos = 0;
  let nodes = 0;

  function skipMisc(): void {
    for (;;) {
      while (pos < text.length && /\s/.test(text[pos])) pos++;
      if (text.startsWith('<?', pos)) {
        const e = text.indexOf('?>', pos);
        if (e < 0) bad('unterminated processing instruction');
        pos = e + 2;
      } else if (text.startsWith('<!--', pos)) {
        const e = text.indexOf('-->', pos);
        if (e < 0) bad('unterminated comment');
        pos = e + 3;
      } else if (text.startsWith('<!DOCTYPE', pos)) {
        const e = text.indexOf('>', pos);
        if (e < 0) bad('unterminated DOCTYPE');
        if (text.slice(pos, e).includes('[')) bad('internal DTD subsets are not accepted');
        pos = e + 1;
      } else return;
    }
  }

  function readTag(): Tag {
    skipMisc();
    if (text[pos] !== '<') bad(`expected a tag at offset ${pos}`);
    const e = text.indexOf('>', pos);
    if (e < 0) bad('unterminated tag');
    let inner = text.slice(pos + 1, e).trim();
    const close = inner.startsWith('/');
    if (close) inner = inner.slice(1).trim();
    const selfClose = inner.endsWith('/');
    if (selfClose) inner = inner.slice(0, -1).trim();
    const name = inner.split(/\s/, 1)[0];
    if (!/^[A-Za-z][A-Za-z0-9_.-]*$/.test(name)) bad(`bad tag name at offset ${pos}`);
    const t = { name, close, selfClose, end: e + 1 };
    pos = e + 1;
    return t;
  }

  function peekClose(name: string): boolean {
    skipMisc();
    if (!text.startsWith('</', pos)) return false;
    const save = pos;
    const t = readTag();
    if (t.name !== name) bad(`expected </${name}>, found </${t.name}>`);
    void save;
    return true;
  }

  function textUntilClose(name: string): string {
    const end = text.indexOf('</' + name, pos);
    if (end < 0) bad(`unterminated <${name}>`);
    const raw = text.slice(pos, end);
    if (raw.includes('<')) bad(`unexpected markup inside <${name}>`);
    pos = end;
    const t = readTag();
    if (!t.close || t.name !== name) bad(`expected </${name}>`);
    return decodeEntities(raw);
  }

  function value(depth: number): PlistValue {
    if (depth > MAX_DEPTH) bad('nesting too deep');
    if (++nodes > MAX_NODES) bad('too many elements');
    const t = readTag();
    if (t.close) bad(`unexpected </${t.name}>`);
    switch (t.name) {
      case 'dict': {
        const d: PlistDict = Object.create(null) as PlistDict;
        if (t.selfClose) return d;
        while (!peekClose('dict')) {
          const k = readTag();
          if (k.name !== 'key' || k.close) bad('expected <key> in <dict>');
          const key = k.selfClose ? '' : textUntilClose('key');
          d[key] = value(depth + 1);
        }
        return d;
      }
      case 'array': {
        const a: PlistValue[] = [];
        if (t.selfClose) return a;
        while (!peekClose('array')) a.push(value(depth + 1));
        return a;
      }
      case 'string':
        return t.selfClose ? '' : textUntilClose('string');
      case 'data':
        return decodeBase64(t.selfClose ? '' : textUntilClose('data'));
      case 'integer': {
        const s = t.selfClose ? '' : textUntilClose('integer').trim();
        if (!/^[+-]?(0x[0-9a-fA-F]+|[0-9]+)$/.test(s)) bad('bad <integer>');
        return Number(s.replace(/^\+/, ''));
      }
      case 'real': {
        const s = t.selfClose ? '' : textUntilClose('real').trim();
        const n = Number(s);
        if (s === '' || Number.isNaN(n)) bad('bad <real>');
        return n;
      }
      case 'date':
        return t.selfClose ? '' : textUntilClose('date');
      case 'true':
      case 'false':
        if (!t.selfClose) textUntilClose(t.name);
        return t.name === 'true';
      default:
        return bad(`unsupported element <${t.name}>`);
    }
  }

  skipMisc();
  const root = readTag();
  if (root.name !== 'plist' || root.close) bad('missing <plist>');
  if (root.selfClose) bad('empty <plist>');
  const v = value(1);
  if (!peekClose('plist')) bad('expected </plist>');
  return v;
}

/** The decoded 'Data' of every resource-fork/blkx entry, in order. */
export function blkxData(root: PlistValue): Buffer[] {
  const isDict = (v: PlistValue | undefined): v is PlistDict =>
    typeof v === 'object' && v !== null && !Array.isArray(v) && !Buffer.isBuffer(v);
  if (!isDict(root)) bad('root is not a dict');
  const rf = root['resource-fork'];
  if (!isDict(rf)) bad('no resource-fork dict');
  const blkx = rf['blkx'];
  if (!Array.isArray(blkx)) bad('no blkx array');
  const out: Buffer[] = [];
  for (const e of blkx) {
    if (!isDict(e)) bad('blkx entry is not a dict');
    const d = e['Data'];
    if (!Buffer.isBuffer(d)) bad('blkx entry has no Data');
    out.push(d);
  }
  return out;
}
