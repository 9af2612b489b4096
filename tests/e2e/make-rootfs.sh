#!/bin/sh
# Debian root filesystem for the end-to-end boots, made once with debootstrap
# and cached as a tarball (the suite and package set are its cache key).
#
#   make-rootfs.sh CACHE_DIR [SUITE]      prints the tarball's path
#
# SUITE: bookworm (default; Pi OS Bookworm first-boots through systemd.run) or
# trixie (with cloud-init, as Pi OS Trixie first-boots through it).
set -eu
cache=$1
suite=${2:-bookworm}
packages=systemd,systemd-sysv,udev,dbus,sudo,openssh-server,curl,linux-image-amd64,iproute2
case $suite in
    bookworm) ;;
    # debootstrap resolves no versioned virtual packages: cffi named by hand.
    trixie) packages=$packages,cloud-init,python3-cffi-backend ;;
    *) echo "make-rootfs.sh: unknown suite $suite" >&2; exit 2 ;;
esac
key=$(printf '%s %s minbase' "$packages" "$suite" | sha256sum | cut -c1-12)
tarball=$cache/rootfs-$suite-$key.tar
if [ -s "$tarball" ]; then
    echo "$tarball"
    exit 0
fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/debootstrap.XXXXXX")
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase --include="$packages" "$suite" "$work/root" \
    "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$work/log" 2>&1 ||
    { tail -n 30 "$work/log" >&2; exit 1; }
# Package caches are not part of an image.
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
tar --numeric-owner -C "$work/root" -cf "$tarball.new" .
mv "$tarball.new" "$tarball"
echo "$tarball"
