#!/bin/sh
# Lets this machine run another architecture's programs (a foreign debootstrap's
# second stage, chroot steps of the image build): binfmt_misc mounted and
# qemu-user-static registered with the F flag, so it works inside a chroot.
#
#   foreign-binaries.sh ARCH
set -eu
arch=$1
case $arch in
    arm64) qemu='qemu-aarch64' ;;
    *) echo "foreign-binaries.sh: no qemu-user mapping for $arch" >&2; exit 2 ;;
esac
misc=/proc/sys/fs/binfmt_misc
if [ ! -e "$misc/register" ]; then
    mount -t binfmt_misc binfmt_misc "$misc" || {
        echo "foreign-binaries.sh: cannot mount binfmt_misc on $misc (needs root)" >&2
        exit 1
    }
fi
if [ ! -e "$misc/$qemu" ]; then
    update-binfmts --enable "$qemu" >/dev/null 2>&1 || {
        echo "foreign-binaries.sh: $qemu is not registered (apt-get install qemu-user-static binfmt-support)" >&2
        exit 1
    }
fi
grep -q '^flags:.*F' "$misc/$qemu" || {
    echo "foreign-binaries.sh: $qemu is registered without the F flag: it cannot run inside a chroot" >&2
    exit 1
}
