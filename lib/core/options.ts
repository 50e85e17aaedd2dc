// qemu-style options: `key=value,key2.child=value` (',,' is a literal comma), `json:{...}`
// pseudo-filenames and dotted keys for children, all turned into one nested tree.
import { ImgError } from './errors';

export type OptionValue = string | OptionTree;
export interface OptionTree { [key: string]: OptionValue }

/** Splits a qemu option string on single commas; ',,' stands for ','. */
export function splitOptionString(s: string): string[] {
  const parts: string[] = [];
  let cur = '';
  for (let i = 0; i < s.length; i++) {
    const c = s[i];
    if (c === ',') {
      if (s[i + 1] === ',') { cur += ','; i++; continue; }
      parts.push(cur);
      cur = '';
    } else {
      cur += c;
    }
  }
  parts.push(cur);
  return parts.filter((p) => p.length > 0);
}

/** Parses `a=1,b.c=2` into a tree. `implied` names the key of a leading bare value (e.g. 'filename'). */
export function parseOptionString(s: string, implied?: string): OptionTree {
  const tree: OptionTree = {};
  const parts = splitOptionString(s);
  parts.forEach((p, i) => {
    const eq = p.indexOf('=');
    if (eq < 0) {
      if (i === 0 && implied) { setDotted(tree, implied, p); return; }
      // qemu treats a bare key as key=on
      setDotted(tree, p, 'on');
      return;
    }
    const key = p.slice(0, eq);
    if (!key) throw new ImgError('usage', `invalid option '${p}': empty key`);
    setDotted(tree, key, p.slice(eq + 1));
  });
  return tree;
}

export function setDotted(tree: OptionTree, dotted: string, value: OptionValue): void {
  const keys = dotted.split('.');
  let t = tree;
  for (let i = 0; i < keys.length - 1; i++) {
    const k = keys[i];
    if (!k) throw new ImgError('usage', `invalid option name '${dotted}'`);
    const cur = t[k];
    if (cur === undefined) {
      const child: OptionTree = {};
      t[k] = child;
      t = child;
    } else if (typeof cur === 'string') {
      // `backing=foo` and `backing.x=y` together: qemu keeps the reference in 'filename'-like
      // form only for strings; a tree and a string for one key conflict.
      throw new ImgError('usage', `option '${keys.slice(0, i + 1).join('.')}' given both as a value and as a group`);
    } else {
      t = cur;
    }
  }
  const last = keys[keys.length - 1];
  if (!last) throw new ImgError('usage', `invalid option name '${dotted}'`);
  const existing = t[last];
  if (existing !== undefined && typeof existing !== 'string' && typeof value !== 'string') {
    mergeTrees(existing, value);
  } else if (existing !== undefined && typeof existing !== typeof value) {
    throw new ImgError('usage', `option '${dotted}' given both as a value and as a group`);
  } else {
    t[last] = value;
  }
}

export function mergeTrees(into: OptionTree, from: OptionTree): OptionTree {
  for (const [k, v] of Object.entries(from)) {
    if (typeof v === 'string') setDotted(into, k, v);
    else {
      const cur = into[k];
      if (cur === undefined) into[k] = cloneTree(v);
      else if (typeof cur === 'string') throw new ImgError('usage', `option '${k}' given both as a value and as a group`);
      else mergeTrees(cur, v);
    }
  }
  return into;
}

export function cloneTree(t: OptionTree): OptionTree {
  const out: OptionTree = {};
  for (const [k, v] of Object.entries(t)) out[k] = typeof v === 'string' ? v : cloneTree(v);
  return out;
}

/** `json:{"driver":"qcow2","file":{"driver":"file","filename":"x"}}` -> tree. Numbers and
 *  booleans become strings as qemu's QDict flattening does; dotted keys are expanded. */
export function parseJsonFilename(s: string): OptionTree {
  const body = s.slice('json:'.length);
  let obj: unknown;
  try {
    obj = JSON.parse(body);
  } catch (e) {
    throw new ImgError('usage', `invalid json: filename: ${(e as Error).message.split('\n')[0]}`);
  }
  if (!obj || typeof obj !== 'object' || Array.isArray(obj)) {
    throw new ImgError('usage', 'invalid json: filename: expected a JSON object');
  }
  const tree: OptionTree = {};
  const walk = (prefix: string, o: Record<string, unknown>): void => {
    for (const [k, v] of Object.entries(o)) {
      const key = prefix ? `${prefix}.${k}` : k;
      if (v === null) setDotted(tree, key, 'null');
      else if (typeof v === 'object' && !Array.isArray(v)) walk(key, v as Record<string, unknown>);
      else if (typeof v === 'string' || typeof v === 'number' || typeof v === 'boolean') {
        setDotted(tree, key, typeof v === 'boolean' ? (v ? 'on' : 'off') : String(v));
      } else throw new ImgError('usage', `invalid json: filename: unsupported value for '${key}'`);
    }
  };
  walk('', obj as Record<string, unknown>);
  return tree;
}

// Accessors that consume options, so the opener can report the ones nobody used.
export class OptionReader {
  private used = new Set<string>();
  constructor(readonly tree: OptionTree, readonly context: string) {}

  has(key: string): boolean { return this.tree[key] !== undefined; }

  str(key: string): string | undefined {
    const v = this.tree[key];
    if (v === undefined) return undefined;
    this.used.add(key);
    if (typeof v !== 'string') throw new ImgError('usage', `${this.context}: option '${key}' expects a value, not a group`);
    return v;
  }

  child(key: string): OptionTree | string | undefined {
    const v = this.tree[key];
    if (v !== undefined) this.used.add(key);
    return v;
  }

  bool(key: string, dflt: boolean): boolean {
    const v = this.str(key);
    if (v === undefined) return dflt;
    return parseBool(v, `${this.context}: option '${key}'`);
  }

  int(key: string, dflt: number, min = 0, max = Number.MAX_SAFE_INTEGER): number {
    const v = this.str(key);
    if (v === undefined) return dflt;
    const n = parseSize(v, `${this.context}: option '${key}'`);
    if (n < min || n > max) throw new ImgError('usage', `${this.context}: option '${key}' must be between ${min} and ${max}`);
    return n;
  }

  choice<T extends string>(key: string, choices: readonly T[], dflt: T): T {
    const v = this.str(key);
    if (v === undefined) return dflt;
    if (!(choices as readonly string[]).includes(v)) {
      throw new ImgError('usage', `${this.context}: invalid value '${v}' for '${key}' (expected ${choices.join(', ')})`);
    }
    return v as T;
  }

  markUsed(key: string): void { this.used.add(key); }

  /** throws for options that nobody consumed */
  finish(): void {
    for (const k of Object.keys(this.tree)) {
      if (!this.used.has(k)) throw new ImgError('usage', `${this.context}: unknown option '${k}'`);
    }
  }
}

export function parseBool(v: string, what: string): boolean {
  if (['on', 'true', 'yes', '1'].includes(v)) return true;
  if (['off', 'false', 'no', '0'].includes(v)) return false;
  throw new ImgError('usage', `${what}: expected on or off, got '${v}'`);
}

const SUFFIX = 'BKMGTPE';
/** qemu-img sizes: plain bytes or k/K, M, G, T, P, E suffixes (powers of 1024), decimals allowed. */
export function parseSize(v: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bBkKmMgGtTpPeE]?)\s*$/.exec(v);
  if (!m) throw new ImgError('usage', `${what}: invalid size '${v}'`);
  const unit = m[2].toUpperCase();
  const mul = unit ? 1024 ** SUFFIX.indexOf(unit) : 1;
  const n = Number(m[1]) * mul;
  if (!Number.isFinite(n) || n > Number.MAX_SAFE_INTEGER) throw new ImgError('usage', `${what}: '${v}' is too large`);
  if (!Number.isInteger(n)) throw new ImgError('usage', `${what}: '${v}' is not a whole number of bytes`);
  return n;
}

/** qemu's human size: 1 KiB, 64 MiB, 1.5 GiB */
export function humanSize(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  if (i === 0) return `${n} B`;
  // qemu prints up to 3 significant digits
  const s = v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
  return `${s.includes('.') ? s.replace(/\.?0+$/, '') : s} ${units[i]}`;
}
