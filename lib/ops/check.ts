// imgmount check: qemu-img check's report and exit codes (0 clean, 2 corrupt, 3 leaks only,
// 1 check not completed, 63 format without checks).
import { ImgError } from '../core/errors';
import { openImage, openProtocolOf, OpenOptions } from '../core/graph';
import { SecretStore } from '../core/secrets';
import type { CheckResult } from '../core/node';
import { drivers } from '../formats';

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
  const file = await openProtocolOf(spec, { ...o, readOnly: repair === 'none', shareRw: repair === 'none' });
  try {
    const secrets = o.secrets ?? new SecretStore();
    let res: CheckResult;
    try {
      res = await drv.check(file, {
        options: {}, readOnly: repair === 'none', secrets, filename, probed: false,
        openBacking: async () => null,
        openChild: async () => { throw new ImgError('unsupported', 'check does not open child images'); },
      }, repair);
    } catch (e) {
      // a driver that cannot do this kind of check (vdi repairs): qemu-img's ENOTSUP, exit 63
      if (e instanceof ImgError && e.kind === 'unsupported' && (e as ImgError & { noCheck?: boolean }).noCheck) {
        return { result: null, filename, format };
      }
      throw e;
    }
    return { result: res, filename, format };
  } finally {
    await file.close();
  }
}

export function checkExitCode(r: CheckResult): number {
  if (r.checkErrors) return 1;
  if (r.corruptions - r.corruptionsFixed > 0) return 2;
  if (r.leaks - r.leaksFixed > 0) return 3;
  return 0;
}

export function checkJson(rep: CheckReport): Record<string, unknown> {
  const r = rep.result!;
  const out: Record<string, unknown> = {};
  if (r.imageEndOffset !== undefined) out['image-end-offset'] = r.imageEndOffset;
  if (r.totalClusters !== undefined) out['total-clusters'] = r.totalClusters;
  out['check-errors'] = r.checkErrors;
  if (r.leaks - r.leaksFixed > 0) out.leaks = r.leaks - r.leaksFixed;
  if (r.corruptions - r.corruptionsFixed > 0) out.corruptions = r.corruptions - r.corruptionsFixed;
  if (r.leaksFixed) out['leaks-fixed'] = r.leaksFixed;
  if (r.corruptionsFixed) out['corruptions-fixed'] = r.corruptionsFixed;
  if (r.allocatedClusters !== undefined) out['allocated-clusters'] = r.allocatedClusters;
  out.filename = rep.filename;
  out.format = rep.format;
  if (r.fragmentedClusters) out['fragmented-clusters'] = r.fragmentedClusters;
  if (r.compressedClusters) out['compressed-clusters'] = r.compressedClusters;
  return out;
}

export function checkHuman(rep: CheckReport): string {
  const r = rep.result!;
  const lines = [...r.messages];
  const corrupt = r.corruptions - r.corruptionsFixed;
  const leaks = r.leaks - r.leaksFixed;
  if (r.corruptionsFixed || r.leaksFixed) {
    lines.push(`The following inconsistencies were found and repaired:\n\n    ${r.leaksFixed} leaked clusters\n    ${r.corruptionsFixed} corruptions\n`);
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
