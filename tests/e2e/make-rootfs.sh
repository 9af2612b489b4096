#!/bin/sh
# Debian root filesystem for the end-to-end boots, made once with mmdebstrap
# and cached as a tarball (the suite, package set and this script are its key).
# arm64, as Raspberry Pi OS runs on a Pi 4 or 5; on another machine the
# packages' scripts run under qemu-user-static through binfmt_misc, set up here.
# mmdebstrap, not debootstrap: it resolves and unpacks with this machine's own
# apt and dpkg, where debootstrap's second stage runs perl over the whole
# package list once per package, emulated (over 30 minutes for trixie here).
#
#   make-rootfs.sh CACHE_DIR [SUITE]      prints the tarball's path
#
# SUITE: bookworm (default; Pi OS Bookworm first-boots through systemd.run) or
# trixie (with cloud-init, as Pi OS Trixie first-boots through it). Each has
# what its Pi OS has to grow a card's root: e2fsprogs, and fdisk (bookworm) or
# cloud-init's growpart (trixie, cloud-guest-utils).
set -eu
cache=$1
suite=${2:-bookworm}
arch=arm64
packages=systemd,systemd-sysv,udev,dbus,sudo,openssh-server,curl,openssl,iproute2,e2fsprogs,linux-image-$arch
case $suite in
    bookworm) packages=$packages,fdisk ;;
    trixie) packages=$packages,cloud-init,cloud-guest-utils ;;
    *) echo "make-rootfs.sh: unknown suite $suite" >&2; exit 2 ;;
esac
# The key covers this script too: how the tree is made is part of what it is.
key=$( (printf '%s %s %s minbase\n' "$packages" "$suite" "$arch"; cat "$0") | sha256sum | cut -c1-12)
tarball=$cache/rootfs-$suite-$arch-$key.tar
if [ -s "$tarball" ]; then
    echo "$tarball"
    exit 0
fi
here=$(cd "$(dirname "$0")" && pwd)
[ "$(dpkg --print-architecture)" = "$arch" ] || sh "$here/foreign-binaries.sh" "$arch"
mkdir -p "$cache"
work=$(mktemp -d "$cache/mmdebstrap.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Put in place before the kernel's package builds its initramfs: the guests are
# QEMU's virt machine (the card is a virtio PCI disk), and emulated, MODULES=most
# (hundreds of modules, a few processes each) takes longer than the rest.
stage=$work/stage
mkdir -p "$stage/etc/initramfs-tools/conf.d" "$stage/etc/initramfs-tools/hooks"
printf 'MODULES=list\n' >"$stage/etc/initramfs-tools/conf.d/piprov-e2e.conf"
cat >"$stage/etc/initramfs-tools/hooks/piprov-e2e" <<'HOOK'
#!/bin/sh
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
manual_add_modules virtio_pci virtio_blk ext4 crc32c_generic
HOOK
chmod 0755 "$stage/etc/initramfs-tools/hooks/piprov-e2e"

started=$(date +%s)
# Nothing here needs to survive a crash (unsafe-io): the tarball is renamed at the end.
mmdebstrap --architectures="$arch" --variant=minbase --include="$packages" \
    --format=tar --dpkgopt=force-unsafe-io --setup-hook="sync-in $stage /" \
    "$suite" "$tarball.new" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$work/log" 2>&1 ||
    { tail -n 30 "$work/log" >&2; rm -f "$tarball.new"; exit 1; }
echo "make-rootfs.sh: $suite $arch made in $(($(date +%s) - started)) s" >&2
mv "$tarball.new" "$tarball"
echo "$tarball"
