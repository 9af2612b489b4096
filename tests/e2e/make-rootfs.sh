#!/bin/sh
# Debian root filesystem for the end-to-end boots, made once with debootstrap
# and cached as a tarball (the suite and package set are its key). arm64, as
# Raspberry Pi OS runs on a Pi 4 or 5; on another machine debootstrap's second
# stage runs under qemu-user-static through binfmt_misc, set up here.
#
#   make-rootfs.sh CACHE_DIR [SUITE]      prints the tarball's path
#
# SUITE: bookworm (default; Pi OS Bookworm first-boots through systemd.run) or
# trixie (with cloud-init, as Pi OS Trixie first-boots through it).
set -eu
cache=$1
suite=${2:-bookworm}
arch=arm64
packages=systemd,systemd-sysv,udev,dbus,sudo,openssh-server,curl,openssl,iproute2,linux-image-$arch
case $suite in
    bookworm) ;;
    # debootstrap resolves no versioned virtual packages: cffi named by hand.
    trixie) packages=$packages,cloud-init,python3-cffi-backend ;;
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
work=$(mktemp -d "$cache/debootstrap.XXXXXX")
trap 'rm -rf "$work"' EXIT
started=$(date +%s)
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Two stages, so the initramfs can be told what to hold before the kernel's
# package builds it: emulated, MODULES=most (hundreds of modules, a few
# processes each) takes longer than the rest of the system.
debootstrap --foreign --arch="$arch" --variant=minbase --include="$packages" "$suite" \
    "$work/root" "$mirror" >"$work/log" 2>&1 || { tail -n 30 "$work/log" >&2; exit 1; }
mkdir -p "$work/root/etc/initramfs-tools/conf.d" "$work/root/etc/initramfs-tools/hooks"
# The guests are QEMU's virt machine: the card is a virtio PCI disk.
printf 'MODULES=list\n' >"$work/root/etc/initramfs-tools/conf.d/piprov-e2e.conf"
cat >"$work/root/etc/initramfs-tools/hooks/piprov-e2e" <<'HOOK'
#!/bin/sh
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
manual_add_modules virtio_pci virtio_blk ext4 crc32c_generic
HOOK
chmod 0755 "$work/root/etc/initramfs-tools/hooks/piprov-e2e"
# Nothing here needs to survive a crash: the tarball is made at the end.
DPKG_FORCE=unsafe-io chroot "$work/root" /debootstrap/debootstrap --second-stage >>"$work/log" 2>&1 ||
    { tail -n 30 "$work/log" >&2; exit 1; }
echo "make-rootfs.sh: $suite $arch made in $(($(date +%s) - started)) s" >&2
# Package caches are not part of an image.
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
tar --numeric-owner -C "$work/root" -cf "$tarball.new" .
mv "$tarball.new" "$tarball"
echo "$tarball"
