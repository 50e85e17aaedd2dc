// The block node: every protocol, format, filter and synthesized disk has this shape
// (qemu's BlockDriverState, nbdkit's `next`). Requests that reach a node have already been
// checked by lib/core/io.ts: in bounds and aligned to `align`.
import type { OptionTree } from './options';
import type { SecretStore } from './secrets';

export type ExtentState = 'data' | 'zero' | 'unallocated';

/** Where the guest bytes of an extent live untransformed in a host file. */
export interface HostLocation {
  fd: number;
  offset: number;
  /** overwriting in place is safe: allocated, not shared with a snapshot, no transformation */
  writable: boolean;
  /** fd was opened with O_DIRECT */
  direct: boolean;
  /** the host bytes are ciphertext, sector by sector, in a cipher the native path can run */
  crypt?: HostCrypt;
  /** call the node's onMappedWrite() when the first write lands in this range (map hints only) */
  notify?: boolean;
}

/** A sector cipher for the native data path (one object per open image: its identity matters). */
export interface HostCrypt {
  /** OpenSSL's name, e.g. aes-256-xts */
  cipher: string;
  key: Uint8Array;
  sectorSize: number;
  /** the IV of the sector holding host byte h is (h - ivBase) / sectorSize */
  ivBase: number;
  /** 64 = plain64, 32 = plain, 0 = no IV (ecb) */
  ivBits: 0 | 32 | 64;
}

export interface Extent {
  offset: number;
  length: number;
  /** 'unallocated' = this layer has nothing: the backing node (or zeros) shows through */
  state: ExtentState;
  /** present when reads of this range may be served straight from a host file */
  host?: HostLocation;
}

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';
export interface WriteFlags { fua?: boolean; /** write compressed clusters (convert -c) */ compressed?: boolean }
export interface ZeroFlags { mayUnmap?: boolean; noFallback?: boolean }

/** Called by a node before it changes how a guest range maps to host storage. */
export type MapInvalidator = (offset: number, length: number) => void;
export type MapHint = (offset: number, length: number, host: HostLocation) => void;

export interface SnapshotInfo {
  id: string;
  name: string;
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  icount?: number;
}

export interface BlockNode {
  readonly driver: string;
  /** guest-visible size in bytes */
  readonly size: number;
  readonly readOnly: boolean;
  /** request alignment in bytes (1 = any) */
  readonly align: number;
  /** the node whose data shows through 'unallocated' extents */
  readonly backing?: BlockNode | null;
  /** the node holding this node's bytes (a format's file), for info and locking */
  readonly file?: BlockNode | null;
  /** filename as qemu prints it */
  readonly filename: string;

  read(buf: Uint8Array, offset: number): Promise<void>;
  write?(buf: Uint8Array, offset: number, flags?: WriteFlags): Promise<void>;
  writeZeroes?(offset: number, length: number, flags?: ZeroFlags): Promise<void>;
  discard?(offset: number, length: number): Promise<void>;
  flush?(): Promise<void>;
  /** the extent starting at `offset`, at most `length` long; this layer only */
  blockStatus(offset: number, length: number): Promise<Extent>;
  close(): Promise<void>;
  /** resizes the node (protocols: the host file; formats: the virtual disk) */
  truncate?(size: number, prealloc?: Preallocation): Promise<void>;

  /** bytes the node occupies on the host (for info's disk size and st_blocks) */
  allocatedSize?(): Promise<number>;
  /** set by the FUSE export; nodes call it before changing a guest range's host mapping */
  mapInvalidator?: MapInvalidator | null;
  /** set by the FUSE export; a node calls it when a range just became servable from the host
   *  (clusters linked ahead of a sequential write): the whole range lies at host.offset
   *  onwards, and the export maps it synchronously, without asking back */
  mapHint?: MapHint | null;
  /** the export reports the first write into a range hinted with `notify` (its start offset):
   *  a sequential write entered the range, so the next one can be linked ahead now */
  onMappedWrite?(offset: number): void;
  /** format-specific data for `info` (qemu-img's "format-specific" object) */
  formatSpecific?(): Promise<{ type: string; data: Record<string, unknown> } | null>;
  /** qemu-img info's extra top-level keys (cluster-size, backing-filename, dirty-flag...) */
  infoExtra?(): Promise<Record<string, unknown>>;
  snapshots?(): Promise<SnapshotInfo[]>;
  /** internal snapshots (qemu-img snapshot -c/-a/-d) */
  snapshotCreate?(tag: string): Promise<void>;
  snapshotApply?(idOrTag: string): Promise<void>;
  snapshotDelete?(idOrTag: string): Promise<void>;
  /** a read-only node showing an internal snapshot's disk (mount -l, <mnt>/snapshots/) */
  openSnapshot?(idOrTag: string): Promise<BlockNode>;
  /** rewrite the header's backing file name/format (qemu-img rebase -u, commit) */
  setBacking?(filename: string | null, format: string | null): Promise<void>;
  /** empties the image (after commit): every cluster becomes unallocated */
  makeEmpty?(): Promise<void>;
}

/** What a format driver receives when it opens an image. */
export interface OpenContext {
  /** the format's own options (generic keys such as driver/file/cache removed) */
  options: OptionTree;
  readOnly: boolean;
  secrets: SecretStore;
  /** the image's filename as the user gave it (relative backing names resolve against it) */
  filename: string;
  /** the format was probed, not named by the user */
  probed: boolean;
  /** only metadata will be asked for (info): an encrypted image may open without its secret */
  headerOnly?: boolean;
  /** opens the backing node named in the header (null: none), honouring the user's `backing`
   *  options (backing=null, backing.driver=..., backing.file.filename=...); read-only */
  openBacking(filename: string | null, format: string | null): Promise<BlockNode | null>;
  /** opens another child such as a data file; `key` names the user's override options */
  openChild(key: string, filename: string, format: string | null, readOnly: boolean): Promise<BlockNode>;
}

export interface CreateContext {
  options: OptionTree;
  secrets: SecretStore;
  size: number | null;
  filename: string;
  /** opens a node (e.g. backing file) to learn its size or copy data */
  open(filename: string, format?: string): Promise<BlockNode>;
}

export interface CheckResult {
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset?: number;
  totalClusters?: number;
  allocatedClusters?: number;
  fragmentedClusters?: number;
  compressedClusters?: number;
  messages: string[];
  /** the counts come from a second check after the repair (remaining problems only) */
  doubleChecked?: boolean;
}

export interface FormatDriver {
  name: string;
  /** score 0..100 from the first bytes (at least 4096 or the whole file) and the filename */
  probe?(head: Uint8Array, filename: string): number;
  /** score 0..100 from the last bytes of the file (up to 4096: dmg's koly, a fixed VHD's footer) */
  probeTail?(tail: Uint8Array, fileSize: number): number;
  open(file: BlockNode, ctx: OpenContext): Promise<BlockNode>;
  create?(ctx: CreateContext): Promise<void>;
  check?(file: BlockNode, ctx: OpenContext, repair: 'none' | 'leaks' | 'all'): Promise<CheckResult>;
  /** creation options this driver accepts (for validation and --help) */
  createOptions?: string[];
  readOnlyFormat?: boolean;
}
