#!/bin/sh
# Seeds for every fuzz target, in CORPUS/<target>/: a complete but tiny Pi-like
# image (MBR, FAT12 boot, ext4 root) so that mutations reach the FAT and ext4
# readers and not just the table parser; its two filesystems alone; a card
# settings file.
#   make-seed.sh CORPUS
set -eu
corpus=$1
mkdir -p "$corpus/inspect_image" "$corpus/flash_map" "$corpus/fat_boot" "$corpus/ext4_facts" "$corpus/card_settings"
out=$corpus/inspect_image/seed.img
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/etc/sudoers.d" "$work/root/var/lib/amazon/ssm"
echo 'VERSION_CODENAME=bookworm' >"$work/root/etc/os-release"
echo 'ssm-user ALL=(ALL) NOPASSWD:ALL' >"$work/root/etc/sudoers.d/ssm-agent-users"
printf '{"ManagedInstanceID":"mi-0123456789abcdef0","Region":"eu-west-1"}' >"$work/root/var/lib/amazon/ssm/registration"
echo 0123456789abcdef0123456789abcdef >"$work/root/etc/machine-id"
printf '/dev/mmcblk0p1 /boot/firmware vfat defaults 0 2\n' >"$work/root/etc/fstab"
echo 'root=PARTUUID=01020304-02 rootwait' >"$work/cmdline.txt"

truncate -s 640K "$out"
printf 'label: dos\nlabel-id: 0x01020304\nstart=8, size=256, type=c\nstart=264, size=1016, type=83\n' | sfdisk --quiet "$out"
mkfs.vfat -C "$work/boot.img" 128 >/dev/null 2>&1
mcopy -i "$work/boot.img" "$work/cmdline.txt" ::cmdline.txt
truncate -s $((1016 * 512)) "$work/root.img"
mkfs.ext4 -q -F -b 1024 -N 32 -O ^has_journal,^resize_inode -d "$work/root" "$work/root.img"
dd if="$work/boot.img" of="$out" bs=512 seek=8 conv=notrunc status=none
dd if="$work/root.img" of="$out" bs=512 seek=264 conv=notrunc status=none
cp "$out" "$corpus/flash_map/seed.img"
cp "$work/boot.img" "$corpus/fat_boot/seed.fat"
cp "$work/root.img" "$corpus/ext4_facts/seed.ext4"
printf 'SOURCE=broker\nBROKER_URL=https://broker.example:8443\n# a note\nSUDO_RULE=\n' >"$corpus/card_settings/seed.conf"
