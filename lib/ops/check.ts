// imgmount check: qemu-img check's report and exit codes (0 clean, 2 corrupt, 3 leaks only,
// 1 check not completed, 63 format without checks).
import { ImgError } from '../core/errors';
import { openImage, openProtocolOf, OpenOptions } from '../core/graph';
import { SecretStore } from '../core/secrets';
import type { CheckResult } from '../core/node';
import { drivers } from '../formats';
import { qdictOrder } from '../core/qdict';

export interface CheckReport { result: CheckResult | null; filename: string; format: string }

export async function checkImage(spec: string, o: OpenOptions, repair: 'none' | 'leaks' | 'all'): Promise<CheckReport> {
  // learn the format (probing when not given), then hand the driver the bare protocol node
  const node = await openImage(spec, { ...o, readOnly: true, noBacking: true, shareRw: true });
  const format = node.driver;
  const filename = node.filename;
  await node.close();
  // synthesized disks (vvfat) have no driver in the format registry: nothing to check
  const drv = drivers.find((d) => d.name === format);
  if (!drv?.check) return { result: null, filename, format };
  const once = async (mode: 'none' | 'leaks' | 'all'): Promise<CheckResult> => {
    const file = await openProtocolOf(spec, { ...o, readOnly: mode === 'none', shareRw: mode === 'none' });
    try {
      return await drv.check!(file, {
        options: {}, readOnly: mode === 'none', secrets: o.secrets ?? new SecretStore(), filename, probed: false,
        openBacking: async () => null,
        openChild: async () => { throw new ImgError('unsupported', 'check does not open child images'); },
      }, mode);
    } finally {
      await file.close();
    }
  };
  let res: CheckResult;
  try {
    res = await once(repair);
  } catch (e) {
    // a driver that cannot do this kind of check (vdi repairs): qemu-img's ENOTSUP, exit 63
    if (e instanceof ImgError && e.kind === 'unsupported' && (e as ImgError & { noCheck?: boolean }).noCheck) {
      return { result: null, filename, format };
    }
    throw e;
  }
  if (repair !== 'none' && (res.leaksFixed || res.corruptionsFixed)) {
    // as qemu-img: check the repaired image again; what remains is what that check finds
    const again = await once('none');
    again.leaksFixed = res.leaksFixed;
    again.corruptionsFixed = res.corruptionsFixed;
    again.messages = [...res.messages, ...again.messages];
    again.doubleChecked = true;
    res = again;
  }
  return { result: res, filename, format };
}

/** problems left after the check (and repair) */
function remaining(r: CheckResult): { corruptions: number; leaks: number } {
  if (r.doubleChecked) return { corruptions: r.corruptions, leaks: r.leaks };
  return { corruptions: r.corruptions - r.corruptionsFixed, leaks: r.leaks - r.leaksFixed };
}

export function checkExitCode(r: CheckResult): number {
  if (r.checkErrors) return 1;
  const left = remaining(r);
  if (left.corruptions > 0) return 2;
  if (left.leaks > 0) return 3;
  return 0;
}

export function checkJson(rep: CheckReport): Record<string, unknown> {
  const r = rep.result!;
  const out: Record<string, unknown> = {};
  if (r.imageEndOffset !== undefined) out['image-end-offset'] = r.imageEndOffset;
  if (r.totalClusters !== undefined) out['total-clusters'] = r.totalClusters;
  out['check-errors'] = r.checkErrors;
  const left = remaining(r);
  if (left.leaks > 0) out.leaks = left.leaks;
  if (left.corruptions > 0) out.corruptions = left.corruptions;
  if (r.leaksFixed) out['leaks-fixed'] = r.leaksFixed;
  if (r.corruptionsFixed) out['corruptions-fixed'] = r.corruptionsFixed;
  if (r.allocatedClusters !== undefined) out['allocated-clusters'] = r.allocatedClusters;
  out.filename = rep.filename;
  out.format = rep.format;
  if (r.fragmentedClusters) out['fragmented-clusters'] = r.fragmentedClusters;
  if (r.compressedClusters) out['compressed-clusters'] = r.compressedClusters;
  return qdictOrder(out);
}

/** the report on stdout; the per-cluster findings (ERROR, Leaked, Repairing) go to stderr as
 *  in qemu-img, see checkMessages */
export function checkHuman(rep: CheckReport): string {
  const r = rep.result!;
  const lines: string[] = [];
  const { corruptions: corrupt, leaks } = remaining(r);
  if (r.corruptionsFixed || r.leaksFixed) {
    lines.push(`The following inconsistencies were found and repaired:\n\n    ${r.leaksFixed} leaked clusters\n    ${r.corruptionsFixed} corruptions\n`);
    if (r.doubleChecked) lines.push('Double checking the fixed image now...');
  }
  if (!corrupt && !leaks && !r.checkErrors) lines.push('No errors were found on the image.');
  else {
    if (corrupt) lines.push(`\n${corrupt} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.`);
    if (leaks) lines.push(`\n${leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.`);
    if (r.checkErrors) lines.push(`\n${r.checkErrors} internal errors have occurred during the check.`);
  }
  if (r.totalClusters && r.allocatedClusters !== undefined) {
    // as qemu-img: fragmented and compressed are shares of the allocated clusters
    const pct = (n: number, of: number): string => (of ? (n * 100) / of : 0).toFixed(2);
    const a = r.allocatedClusters;
    lines.push(`${a}/${r.totalClusters} = ${pct(a, r.totalClusters)}% allocated, ${pct(r.fragmentedClusters ?? 0, a)}% fragmented, ${pct(r.compressedClusters ?? 0, a)}% compressed clusters`);
  }
  if (r.imageEndOffset !== undefined) lines.push(`Image end offset: ${r.imageEndOffset}`);
  return lines.join('\n');
}

export function checkMessages(rep: CheckReport): string[] {
  return rep.result?.messages ?? [];
}
