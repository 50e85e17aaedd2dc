// One error type for the whole tool. `kind` is mapped to an exit code (CLI) and to an
// errno (FUSE) in exactly one place each, below; data paths never throw strings.
import os from 'node:os';

export type ErrorKind =
  | 'usage'       // bad command line or option
  | 'image'       // bad, corrupt or unsupported image
  | 'locked'      // locked by another process, or mount busy
  | 'crypto'      // wrong or missing secret, crypto failure
  | 'io'          // host I/O failure
  | 'readonly'    // write to a read-only node
  | 'range'       // request outside the image
  | 'unsupported' // operation the node does not implement
  | 'nospace'
  | 'permission'; // refused by policy (e.g. a probed raw image turning into a format)

export class ImgError extends Error {
  readonly kind: ErrorKind;
  override readonly cause?: unknown;
  constructor(kind: ErrorKind, message: string, cause?: unknown) {
    super(message);
    this.kind = kind;
    this.cause = cause;
    this.name = 'ImgError';
  }
}

export const EXIT_CODES: Record<ErrorKind, number> = {
  usage: 1,
  image: 2,
  unsupported: 2,
  locked: 3,
  crypto: 4,
  io: 5,
  readonly: 5,
  range: 5,
  nospace: 5,
  permission: 5,
};

const errnoOf: Record<ErrorKind, number> = {
  usage: os.constants.errno.EINVAL,
  image: os.constants.errno.EIO,
  unsupported: os.constants.errno.EOPNOTSUPP,
  locked: os.constants.errno.EBUSY,
  crypto: os.constants.errno.EIO,
  io: os.constants.errno.EIO,
  readonly: os.constants.errno.EROFS,
  range: os.constants.errno.EINVAL,
  nospace: os.constants.errno.ENOSPC,
  permission: os.constants.errno.EPERM,
};

/** errno for a FUSE reply; host errors keep their own errno where it is meaningful */
export function toErrno(e: unknown): number {
  if (e instanceof ImgError) {
    const host = hostErrno(e.cause);
    if (e.kind === 'io' && host) return host;
    return errnoOf[e.kind];
  }
  return hostErrno(e) || os.constants.errno.EIO;
}

function hostErrno(e: unknown): number {
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  if (typeof code === 'string' && code in os.constants.errno) {
    return (os.constants.errno as Record<string, number>)[code];
  }
  return 0;
}

export function exitCodeOf(e: unknown): number {
  if (e instanceof ImgError) return EXIT_CODES[e.kind];
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  if (code === 'ENOENT' || code === 'EACCES' || code === 'EISDIR' || code === 'ENOTDIR') return 1;
  if (code === 'EBUSY' || code === 'EAGAIN') return 3;
  return 5;
}

/** Converts a Node system error into an ImgError with a one-line reason. */
export function ioError(what: string, e: unknown): ImgError {
  if (e instanceof ImgError) return e;
  const err = e as NodeJS.ErrnoException;
  const reason = err?.code ? `${describeCode(err.code)}` : String(err?.message ?? e);
  const kind: ErrorKind = err?.code === 'ENOENT' || err?.code === 'EISDIR' || err?.code === 'ENOTDIR'
    ? 'usage' : err?.code === 'ENOSPC' ? 'nospace' : err?.code === 'EROFS' ? 'readonly' : 'io';
  return new ImgError(kind, `${what}: ${reason}`, e);
}

const codeText: Record<string, string> = {
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  EPERM: 'Operation not permitted',
  EISDIR: 'Is a directory',
  ENOTDIR: 'Not a directory',
  ENOSPC: 'No space left on device',
  EROFS: 'Read-only file system',
  EBUSY: 'Device or resource busy',
  EIO: 'Input/output error',
  EINVAL: 'Invalid argument',
  EEXIST: 'File exists',
  ENOTCONN: 'Transport endpoint is not connected',
};

export function describeCode(code: string): string {
  return codeText[code] ?? code;
}

export function strerror(errno: number): string {
  for (const [name, num] of Object.entries(os.constants.errno)) {
    if (num === errno) return describeCode(name);
  }
  return `errno ${errno}`;
}

/** The single line the CLI prints: `imgmount: <what failed>: <why>` (message holds both parts). */
export function formatError(e: unknown): string {
  const msg = e instanceof Error ? e.message : String(e);
  return `imgmount: ${msg.split('\n')[0]}`;
}
