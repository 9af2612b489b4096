#!/bin/sh
# Installs the system tools the tests, the demo and the fixture builder use.
# As root it installs what is missing with apt-get; otherwise it names what to install.
set -eu

# tool:debian-package (arch-test: mmdebstrap refuses a foreign-architecture root without it)
needed="sfdisk:fdisk mkfs.vfat:dosfstools fsck.vfat:dosfstools mcopy:mtools
mkfs.ext4:e2fsprogs e2fsck:e2fsprogs debugfs:e2fsprogs openssl:openssl ssh-keygen:openssh-client
curl:curl python3:python3
shellcheck:shellcheck visudo:sudo systemd-analyze:systemd
xz:xz-utils zstd:zstd bzip2:bzip2 zip:zip losetup:mount partx:util-linux bmaptool:bmap-tools
mkswap:util-linux findmnt:util-linux lsblk:util-linux
mmdebstrap:mmdebstrap qemu-system-aarch64:qemu-system-arm qemu-aarch64-static:qemu-user-static
update-binfmts:binfmt-support dtc:device-tree-compiler man:man-db dpkg-shlibdeps:dpkg-dev
psql:postgresql-client runuser:util-linux gdb:gdb arch-test:arch-test
wget:wget unshare:util-linux script:bsdutils chromium:chromium"

missing=
for pair in $needed; do
    tool=${pair%%:*}
    package=${pair#*:}
    if ! PATH="$PATH:/sbin:/usr/sbin" command -v "$tool" >/dev/null 2>&1; then
        case " $missing " in *" $package "*) ;; *) missing="$missing $package" ;; esac
    fi
done
# The broker's PostgreSQL tests run a private server (scripts/postgres.sh).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql"
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
else
    echo "missing system packages:$missing" >&2
    echo "install them with: sudo apt-get install$missing" >&2
    exit 1
fi
