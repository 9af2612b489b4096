#!/bin/sh
# shellcheck disable=SC2016 # the --customize code is expanded by make-image.sh
# piprov capture against what people do today, `dd bs=4M if=DEV | xz -T0 -3`,
# both cold, at one compression level, from a card-speed loop device (reads
# throttled to 150 MB/s by a cgroup v1 blkio throttle, as in run.sh): a 4 GiB
# card whose root holds about 1 GB of real files (this machine's
# /usr/lib/x86_64-linux-gnu and /usr/share/doc, /usr/share/locale) and whose
# free blocks hold 500 MB of old data (incompressible, as the .deb files an apt
# cache leaves: written as a file, then deleted). Also the physical limit of
# the capture: max(bytes read ÷ read speed, xz -3's CPU time for the captured
# image ÷ cores), measured in the same run.
#
#   bench/capture.sh [WORK]       (run by bench/run.sh; needs root)
set -eu
cd "$(dirname "$0")/.."
piprov=$PWD/target/release/piprov
work=${1:-$(mktemp -d /var/tmp/piprov-bench.XXXXXX)}
READ_BPS=${CARD_READ_BPS:-150000000}
LEVEL=3
cg=/sys/fs/cgroup/blkio/piprov-capture-bench
if [ "$(id -u)" != 0 ] || [ ! -w /sys/fs/cgroup/blkio ]; then
    echo "capture case skipped: it needs root, losetup and cgroup v1 blkio"
    exit 0
fi
card=$work/capture-card.img
if [ ! -f "$card" ]; then
    echo "building $card"
    tests/fixtures/make-image.sh --variant golden --size 4096 --customize '
        mkdir -p "$root/usr/lib" "$root/usr/share" "$root/var/cache/apt/archives"
        cp -a /usr/lib/x86_64-linux-gnu "$root/usr/lib/"
        cp -a /usr/share/doc /usr/share/locale "$root/usr/share/"' "$card.tmp"
    start=$(sfdisk -J "$card.tmp" | sed -n 's/.*"start": *\([0-9]*\).*/\1/p' | sed -n 2p)
    part=$work/capture-root.part
    dd if="$card.tmp" of="$part" bs=512 skip="$start" status=none conv=sparse
    head -c 500000000 /dev/urandom >"$work/old.deb"
    # debugfs says what failed on stderr but exits 0: the file must be there.
    debugfs -w -R "write $work/old.deb /var/cache/apt/archives/old.deb" "$part" >/dev/null
    debugfs -R "stat /var/cache/apt/archives/old.deb" "$part" 2>/dev/null | grep -q 'Size: 500000000' ||
        { echo "the old data did not reach the card's root" >&2; exit 1; }
    debugfs -w -R "rm /var/cache/apt/archives/old.deb" "$part" >/dev/null
    dd if="$part" of="$card.tmp" bs=512 seek="$start" conv=notrunc,sparse status=none
    rm -f "$part" "$work/old.deb"
    mv "$card.tmp" "$card"
fi
mkdir -p "$cg"
dev=$(losetup -f --show -r "$card")
cleanup() {
    losetup -d "$dev" 2>/dev/null || true
    rm -f "$work"/cap-*.img*
    rmdir "$cg" 2>/dev/null || true
}
trap cleanup EXIT
majmin=$(lsblk -dno MAJ:MIN "$dev" | tr -d ' ')
echo "$majmin $READ_BPS" >"$cg/blkio.throttle.read_bps_device"
throttled() { sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$cg" "$@"; }
cold() { sync; echo 3 >/proc/sys/vm/drop_caches; blockdev --flushbufs "$dev"; }
ms() { date +%s%3N; }

cold
t0=$(ms)
throttled sh -c "dd bs=4M if=$dev status=none | xz -T0 -$LEVEL >$work/cap-dd.img.xz"
t_dd=$(( $(ms) - t0 ))
cold
t0=$(ms)
throttled "$piprov" capture --json --level "$LEVEL" "$dev" "$work/cap-piprov.img.xz" >"$work/cap-summary.json" || [ $? -eq 1 ]
t_piprov=$(( $(ms) - t0 ))
read_bytes=$(sed -n 's/.*"bytes_read": *\([0-9]*\).*/\1/p' "$work/cap-summary.json" | head -n1)
# xz's CPU time for the captured image (its used bytes, and holes as zeroes).
xz -dc "$work/cap-piprov.img.xz" >"$work/cap-captured.img"
cpu=$( { /usr/bin/time -f '%U %S' xz -T0 -"$LEVEL" -c "$work/cap-captured.img" >/dev/null; } 2>&1 | tail -n1)
cores=$(nproc)
xz_ms=$(echo "$cpu" | awk -v c="$cores" '{printf "%d", ($1 + $2) * 1000 / c}')
read_ms=$(( read_bytes * 1000 / READ_BPS ))
limit=$read_ms
[ "$xz_ms" -gt "$limit" ] && limit=$xz_ms
size() { stat -c %s "$1"; }
echo "capture: a 4 GiB card at $((READ_BPS / 1000000)) MB/s read, xz -$LEVEL, $cores cores, cold, ms"
printf '%-40s %10s %10s %12s\n' "" "ms" "dd/this" "archive"
printf '%-40s %10d %10s %12d\n' "dd bs=4M | xz -T0 -$LEVEL" "$t_dd" "1.00" "$(size "$work/cap-dd.img.xz")"
printf '%-40s %10d %10s %12d\n' "piprov capture --level $LEVEL" "$t_piprov" \
    "$(awk -v a="$t_dd" -v b="$t_piprov" 'BEGIN{printf "%.2f", a / b}')" "$(size "$work/cap-piprov.img.xz")"
printf '%-40s %10d %10s\n' "limit: max(read $read_bytes B, xz CPU/cores)" "$limit" \
    "$(awk -v a="$t_piprov" -v b="$limit" 'BEGIN{printf "this/limit %.2f", a / b}')"
blocks=$(tr -d ' \n' <"$work/cap-summary.json" | sed -n 's/.*"xz_blocks":{\([^}]*\)}.*/\1/p')
field() { echo "$blocks" | sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p"; }
echo "xz blocks compressed while the card was read or the root shrunk, and kept: $(field made_ahead) of $(field total)"
