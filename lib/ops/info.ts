// imgmount info: the fields and key names of qemu-img info.
import { openImage, OpenOptions } from '../core/graph';
import type { BlockNode, SnapshotInfo } from '../core/node';
import { humanSize } from '../core/options';
import { qdictOrder } from '../core/qdict';

export interface ImageInfo { [key: string]: unknown }

export async function nodeInfo(node: BlockNode): Promise<ImageInfo> {
  const info: ImageInfo = {};
  const extra = node.infoExtra ? await node.infoExtra() : {};
  // qemu-img's key order: its QAPI struct prints the backing format first
  if (extra['backing-filename-format'] !== undefined) info['backing-filename-format'] = extra['backing-filename-format'];
  const snaps = node.snapshots ? await node.snapshots() : [];
  if (snaps.length) {
    info.snapshots = snaps.map((s) => ({
      icount: s.icount ?? 0,
      'vm-clock-nsec': s.vmClockNsec % 1e9,
      name: s.name,
      'date-sec': s.dateSec,
      'date-nsec': s.dateNsec,
      'vm-clock-sec': Math.floor(s.vmClockNsec / 1e9),
      id: s.id,
      'vm-state-size': s.vmStateSize,
    }));
  }
  info['virtual-size'] = node.size;
  info.filename = node.filename;
  if (extra['cluster-size'] !== undefined) info['cluster-size'] = extra['cluster-size'];
  info.format = node.driver;
  // a format node that spans several files (vmdk extents) sums them itself
  const sizer = node.allocatedSize ? node : (node.file ?? node);
  if (sizer.allocatedSize) info['actual-size'] = await sizer.allocatedSize();
  const fs = node.formatSpecific ? await node.formatSpecific() : null;
  if (fs) info['format-specific'] = fs;
  if (extra.encrypted) info.encrypted = true;
  for (const k of ['full-backing-filename', 'backing-filename']) {
    if (extra[k] !== undefined) info[k] = extra[k];
  }
  for (const [k, v] of Object.entries(extra)) {
    if (!(k in info) && k !== 'dirty-flag' && k !== 'encrypted') info[k] = v;
  }
  // qemu prints dirty-flag only for drivers with bdrv_get_info; others return 'dirty-flag': null
  if (extra['dirty-flag'] !== null) info['dirty-flag'] = !!extra['dirty-flag'];
  return qdictOrder(info);
}

export async function imageInfo(spec: string, o: OpenOptions, backingChain: boolean): Promise<ImageInfo[]> {
  const node = await openImage(spec, { ...o, readOnly: true, noBacking: !backingChain, shareRw: true, headerOnly: true });
  try {
    const out: ImageInfo[] = [];
    let cur: BlockNode | null | undefined = node;
    while (cur) {
      out.push(await nodeInfo(cur));
      if (!backingChain) break;
      cur = cur.backing;
    }
    return out;
  } finally {
    await node.close();
  }
}

function pad(s: string, n: number): string { return s.length >= n ? s : s + ' '.repeat(n - s.length); }
function lpad(s: string, n: number): string { return s.length >= n ? s : ' '.repeat(n - s.length) + s; }

function formatDate(sec: number): string {
  const d = new Date(sec * 1000);
  const p = (x: number): string => String(x).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

function formatClock(nsec: number): string {
  const ms = Math.floor(nsec / 1e6);
  const h = Math.floor(ms / 3600000);
  const m = Math.floor((ms % 3600000) / 60000);
  const s = Math.floor((ms % 60000) / 1000);
  const p = (x: number, n = 2): string => String(x).padStart(n, '0');
  return `${p(h)}:${p(m)}:${p(s)}.${p(ms % 1000, 3)}`;
}

export function snapshotTable(snaps: SnapshotInfo[]): string {
  const lines = ['ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT'];
  for (const s of snaps) {
    lines.push(`${pad(s.id, 10)}${pad(s.name, 18)}${lpad(humanSize(s.vmStateSize), 7)} ${formatDate(s.dateSec)} ${formatClock(s.vmClockNsec)} ${lpad(String(s.icount ?? 0), 10)}`);
  }
  return lines.join('\n');
}

function specificLines(data: Record<string, unknown>, indent: string): string[] {
  const out: string[] = [];
  for (const [k, v] of Object.entries(data)) {
    const key = k.replace(/-/g, ' ');
    if (v && typeof v === 'object' && !Array.isArray(v)) {
      out.push(`${indent}${key}:`);
      out.push(...specificLines(v as Record<string, unknown>, indent + '    '));
    } else if (Array.isArray(v)) {
      out.push(`${indent}${key}:`);
      for (const item of v) {
        if (item && typeof item === 'object') {
          const sub = specificLines(item as Record<string, unknown>, indent + '        ');
          if (sub.length) sub[0] = `${indent}    [${v.indexOf(item)}]:\n${sub[0]}`;
          out.push(...sub);
        } else out.push(`${indent}    ${String(item)}`);
      }
    } else out.push(`${indent}${key}: ${String(v)}`);
  }
  return out;
}

export function humanInfo(info: ImageInfo): string {
  const lines = [
    `image: ${String(info.filename)}`,
    `file format: ${String(info.format)}`,
    `virtual size: ${humanSize(info['virtual-size'] as number)} (${String(info['virtual-size'])} bytes)`,
    `disk size: ${info['actual-size'] !== undefined ? humanSize(info['actual-size'] as number) : 'unavailable'}`,
  ];
  if (info.encrypted) lines.push('encrypted: yes');
  if (info['cluster-size'] !== undefined) lines.push(`cluster_size: ${String(info['cluster-size'])}`);
  if (info['backing-filename'] !== undefined) {
    const full = info['full-backing-filename'];
    const b = String(info['backing-filename']);
    lines.push(`backing file: ${b}${full !== undefined && full !== b ? ` (actual path: ${String(full)})` : ''}`);
  }
  if (info['backing-filename-format'] !== undefined) lines.push(`backing file format: ${String(info['backing-filename-format'])}`);
  const snaps = info.snapshots as Array<Record<string, number | string>> | undefined;
  if (snaps && snaps.length) {
    lines.push('Snapshot list:');
    lines.push(snapshotTable(snaps.map((s) => ({
      id: String(s.id), name: String(s.name), vmStateSize: Number(s['vm-state-size']), dateSec: Number(s['date-sec']),
      dateNsec: Number(s['date-nsec']), vmClockNsec: Number(s['vm-clock-sec']) * 1e9 + Number(s['vm-clock-nsec']), icount: Number(s.icount),
    }))));
  }
  const fsd = info['format-specific'] as { type: string; data: Record<string, unknown> } | undefined;
  if (fsd && Object.keys(fsd.data).length) {
    lines.push('Format specific information:');
    lines.push(...specificLines(fsd.data, '    '));
  }
  return lines.join('\n');
}
