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
