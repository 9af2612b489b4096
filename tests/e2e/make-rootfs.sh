#!/bin/sh
# Debian bookworm root filesystem for the end-to-end boots, made once with
# debootstrap and cached as a tarball (the package set below is its cache key).
#
#   make-rootfs.sh CACHE_DIR      prints the tarball's path
set -eu
cache=$1
packages=systemd,systemd-sysv,udev,dbus,sudo,openssh-server,curl,linux-image-amd64,iproute2
key=$(printf '%s bookworm minbase' "$packages" | sha256sum | cut -c1-12)
tarball=$cache/rootfs-bookworm-$key.tar
if [ -s "$tarball" ]; then
    echo "$tarball"
    exit 0
fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/debootstrap.XXXXXX")
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase --include="$packages" bookworm "$work/root" \
    "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$work/log" 2>&1 ||
    { tail -n 30 "$work/log" >&2; exit 1; }
# Package caches are not part of an image.
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
tar --numeric-owner -C "$work/root" -cf "$tarball.new" .
mv "$tarball.new" "$tarball"
echo "$tarball"
