#!/bin/sh
# Rebuilds the sample images in this folder (Debian: fdisk, dosfstools, mtools).
set -eu
cd "$(dirname "$0")"
rm -f sample-mbr-fat.raw part.img
truncate -s 4M sample-mbr-fat.raw
printf 'label: dos\nstart=2048, type=c\n' | sfdisk -q sample-mbr-fat.raw
truncate -s $((4 * 1024 * 1024 - 2048 * 512)) part.img
mkfs.fat -F 12 -n IMGMOUNT -i 12345678 part.img >/dev/null
printf 'Hello from imgmount.\nThis file lives on a FAT partition inside an MBR disk image.\n' > hello.txt
MTOOLS_SKIP_CHECK=1 mcopy -i part.img -m hello.txt ::HELLO.TXT
dd if=part.img of=sample-mbr-fat.raw bs=512 seek=2048 conv=notrunc status=none
rm -f part.img hello.txt

# sample.qcow2: a qcow2 overlay on sample-base.qcow2 (relative backing path). Its internal
# snapshot "pristine" holds the disk before NOTES.TXT was added; the current state has it.
rm -f sample-base.qcow2 sample.qcow2 notes.raw
qemu-img convert -f raw -O qcow2 sample-mbr-fat.raw sample-base.qcow2
qemu-img create -q -f qcow2 -b sample-base.qcow2 -F qcow2 sample.qcow2
qemu-img snapshot -c pristine sample.qcow2
cp sample-mbr-fat.raw notes.raw
printf 'NOTES.TXT was written into the overlay sample.qcow2; its backing file does not have it.\n' > notes.txt
MTOOLS_SKIP_CHECK=1 mcopy -i notes.raw@@1M -m notes.txt ::NOTES.TXT
python3 - <<'PY'
import subprocess
a = open('sample-mbr-fat.raw', 'rb').read(); b = open('notes.raw', 'rb').read()
C = 65536
for off in range(0, len(b), C):
    if a[off:off+C] != b[off:off+C]:
        open('chunk.bin', 'wb').write(b[off:off+C])
        subprocess.run(['qemu-io', '-f', 'qcow2', '-c', f'write -s chunk.bin {off} {C}', 'sample.qcow2'], check=True, stdout=subprocess.DEVNULL)
PY
rm -f notes.raw notes.txt chunk.bin
