// imgmount map: qemu-img map's extents through the backing chain.
import { chainStatus } from '../core/io';
import { openImage, OpenOptions } from '../core/graph';
import type { BlockNode } from '../core/node';

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  filename?: string;
}

export async function mapNode(node: BlockNode): Promise<MapEntry[]> {
  const out: MapEntry[] = [];
  let o = 0;
  let depthSeen = 0;
  for (let b: BlockNode | null | undefined = node; b; b = b.backing) depthSeen++;
  while (o < node.size) {
    const ext = await chainStatus(node, o, node.size - o);
    const present = ext.depth >= 0;
    const e: MapEntry = {
      start: o,
      length: ext.length,
      // an unallocated range reports the depth of the last image of the chain, as qemu does
      depth: present ? ext.depth : depthSeen - 1,
      present,
      zero: ext.zero,
      data: ext.data,
    };
    if (ext.host && present) { e.offset = ext.host.offset; e.filename = ext.node?.file?.filename ?? ext.node?.filename; }
    const last = out[out.length - 1];
    if (last && last.depth === e.depth && last.present === e.present && last.zero === e.zero && last.data === e.data &&
      last.filename === e.filename &&
      ((last.offset === undefined && e.offset === undefined) ||
        (last.offset !== undefined && e.offset !== undefined && last.offset + last.length === e.offset))) {
      last.length += e.length;
    } else out.push(e);
    o += ext.length;
  }
  return out;
}

export async function mapImage(spec: string, o: OpenOptions): Promise<MapEntry[]> {
  const node = await openImage(spec, { ...o, readOnly: true, shareRw: true });
  try {
    return await mapNode(node);
  } finally {
    await node.close();
  }
}

export function mapJson(entries: MapEntry[]): string {
  const rows = entries.map((e) => {
    const parts = [`"start": ${e.start}`, `"length": ${e.length}`, `"depth": ${e.depth}`, `"present": ${e.present}`,
      `"zero": ${e.zero}`, `"data": ${e.data}`];
    if (e.offset !== undefined) parts.push(`"offset": ${e.offset}`);
    return `{ ${parts.join(', ')}}`;
  });
  return `[${rows.join(',\n')}]`;
}

export function mapHuman(entries: MapEntry[]): string {
  // C's %#x prints a bare 0 for zero
  const hex = (n: number): string => (n ? `0x${n.toString(16)}` : '0');
  const pad = (s: string): string => s.padEnd(16);
  const lines = [`${pad('Offset')}${pad('Length')}${pad('Mapped to')}File`];
  for (const e of entries) {
    if (!e.data || e.offset === undefined) continue;
    lines.push(`${pad(hex(e.start))}${pad(hex(e.length))}${pad(hex(e.offset))}${e.filename ?? ''}`);
  }
  return lines.join('\n');
}
