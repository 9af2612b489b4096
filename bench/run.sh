#!/bin/sh
# shellcheck disable=SC2016 # the --customize code is expanded by make-image.sh
# Times piprov flash against dd and bmaptool in one run, on the same image and the
# same kind of target, and prints each as a ratio to dd.
#
#   bench/run.sh            (make bench)   BENCH_DIR=… to keep the files
#
# The image: Pi-OS-like, 2 GiB, about a third of it real files (this machine's
# /usr/lib/x86_64-linux-gnu). Targets are files on the same filesystem as the
# image; the 4-card batch is also timed on tmpfs, where the targets do not
# share a disk. Page caches are dropped before each run when we are root.
set -eu
cd "$(dirname "$0")/.."
cargo build --release -q
piprov=$PWD/target/release/piprov
work=${BENCH_DIR:-$(mktemp -d /var/tmp/piprov-bench.XXXXXX)}
mkdir -p "$work"
img=$work/bench.img
export PIPROV_CACHE_DIR="$work/cache"

if [ ! -f "$img" ]; then
    echo "building $img"
    tests/fixtures/make-image.sh --variant golden --size 2048 \
        --customize 'mkdir -p "$root/usr/lib" && cp -a /usr/lib/x86_64-linux-gnu "$root/usr/lib/"' "$img"
fi
command -v bmaptool >/dev/null || { echo "bmaptool missing: apt-get install bmap-tools" >&2; exit 1; }
# Kept away from the image: beside it, piprov would use it instead of its own map.
bmap=$work/bmap/bench.bmap
mkdir -p "$work/bmap"
[ -f "$bmap" ] || bmaptool -q create -o "$bmap" "$img"
rm -f "$img.bmap"
# The archive, as Raspberry Pi OS ships its images: xz in many blocks.
xz=$work/xz/bench.img.xz
mkdir -p "$work/xz"
[ -f "$xz" ] || xz -T0 -3 -c "$img" >"$xz"

shm=/dev/shm/piprov-bench
# Before each timed run: no file targets left over, nothing in the page cache.
fresh_start() {
    rm -f "$work"/t*.img "$shm"-t*.img
    # An archive's first flash: nothing of it decoded yet (raw images' hashes stay).
    rm -f "$PIPROV_CACHE_DIR"/image-*.img "$PIPROV_CACHE_DIR"/archive-*.json
    sync
    if [ "$(id -u)" = 0 ]; then echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; fi
}

# time_rounds ROUNDS PREFIX RUNNER CASE…: each round runs every case once
# (RUNNER CASE) from a fresh start; PREFIX_CASE is set to its best round and
# PREFIX_CASE_median to its median, in ms. Rounds interleave the cases, so a
# slow spell of the (shared, noisy) disk hits all of them alike, and each round
# starts one case later, so no case always follows dd's 2 GiB, which the VM's
# host is still writing out (it made that case's median 15-20% slower).
time_rounds() {
    rounds=$1 prefix=$2 runner=$3
    shift 3
    round=0
    while [ "$round" -lt "$rounds" ]; do
        for case in "$@"; do
            fresh_start
            start=$(date +%s%N)
            "$runner" "$case" >/dev/null 2>&1 || { echo "$prefix $case failed" >&2; exit 1; }
            end=$(date +%s%N)
            ms=$(( (end - start) / 1000000 ))
            eval "${prefix}_${case}_all=\"\${${prefix}_${case}_all:-} $ms\""
        done
        round=$((round + 1))
        first=$1
        shift
        set -- "$@" "$first"
    done
    for case in "$@"; do
        all= && eval "all=\$${prefix}_${case}_all"
        # shellcheck disable=SC2086 # one number per word
        sorted=$(printf '%s\n' $all | sort -n)
        eval "${prefix}_$case=$(echo "$sorted" | head -n 1)"
        eval "${prefix}_${case}_median=$(echo "$sorted" | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')"
    done
}

RUNS=${RUNS:-3}
t=$work/t1.img
# --as-is: the image written unchanged, as dd and bmaptool write it (without a
# recipe piprov would first audit the whole image, decoding an .xz before any
# card; flashing with --recipe writes while it decodes, as these cases do).
flash() { "$piprov" flash "$img" "$@" --as-is --yes --quiet; }
run_case() {
    case $1 in
    dd) dd if="$img" of="$t" bs=4M oflag=direct conv=fsync status=none ;;
    bmap) bmaptool -q copy --bmap "$bmap" "$img" "$t" ;;
    bmap_nv) bmaptool -q copy --no-verify --bmap "$bmap" "$img" "$t" ;;
    full_nv) flash "$t" --full --no-verify ;;
    full) flash "$t" --full ;;
    map_nv) flash "$t" --no-verify ;;
    map) flash "$t" ;;
    batch) flash "$work/t1.img" "$work/t2.img" "$work/t3.img" "$work/t4.img" ;;
    shm_bmap_nv) bmaptool -q copy --no-verify --bmap "$bmap" "$img" "$shm-t1.img" ;;
    shm_map_nv) flash "$shm-t1.img" --no-verify ;;
    shm_one) flash "$shm-t1.img" ;;
    shm_four) flash "$shm-t1.img" "$shm-t2.img" "$shm-t3.img" "$shm-t4.img" ;;
    xz_dc) xz -T0 -dc "$xz" >/dev/null ;;
    xz_bmap) bmaptool -q copy --bmap "$bmap" "$xz" "$t" ;;
    xz_bmap_nv) bmaptool -q copy --no-verify --bmap "$bmap" "$xz" "$t" ;;
    xz_map_nv) "$piprov" flash "$xz" "$t" --no-verify --as-is --yes --quiet ;;
    xz_map) "$piprov" flash "$xz" "$t" --as-is --yes --quiet ;;
    esac
}
time_rounds "$RUNS" best run_case dd bmap bmap_nv full_nv full map_nv map batch \
    shm_bmap_nv shm_map_nv shm_one shm_four xz_dc xz_bmap xz_bmap_nv xz_map_nv xz_map
fresh_start

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
# row LABEL PREFIX CASE BASE [WHAT]: best and median ms, each as a ratio: by
# default the speed-up over BASE; with WHAT=per, CASE's time over BASE's.
row() {
    eval "b=\$${2}_$3 m=\$${2}_${3}_median bb=\$${2}_$4 bm=\$${2}_${4}_median"
    # shellcheck disable=SC2154 # b, m, bb, bm are set by the eval
    if [ "${5:-}" = per ]; then
        printf '%-34s %7s %7s %8s %8s  (x %s)\n' "$1" "$b" "$m" "$(ratio "$b" "$bb")" "$(ratio "$m" "$bm")" "$4"
    else
        printf '%-34s %7s %7s %8s %8s\n' "$1" "$b" "$m" "$(ratio "$bb" "$b")" "$(ratio "$bm" "$m")"
    fi
}
header() { printf '%-34s %7s %7s %8s %8s\n' "$1" best median "$2" "$2"; }
mapped=$("$piprov" flash "$img" "$work/t1.img" --as-is --yes --json 2>/dev/null | tail -n 1 | sed -n 's/.*"mapped_bytes":\([0-9]*\).*/\1/p')
rm -f "$work"/t*.img
echo "image: $(du -h --apparent-size "$img" | cut -f1) ($(du -h "$img" | cut -f1) allocated in the file), piprov map: $((mapped / 1048576)) MiB, $RUNS rounds, ms"
header "targets: files on the image's disk" "dd/this"
row "dd bs=4M oflag=direct conv=fsync" best dd dd
row "bmaptool copy" best bmap dd
row "bmaptool copy --no-verify" best bmap_nv dd
row "piprov flash --full --no-verify" best full_nv dd
row "piprov flash --full" best full dd
row "piprov flash --no-verify (map)" best map_nv dd
row "piprov flash (map, verified)" best map dd
header "" "bmap/this"
row "piprov --no-verify vs bmaptool's" best map_nv bmap_nv
row "piprov (verified) vs bmaptool copy" best map bmap
header "batches" "this/one"
row "piprov flash, 4 targets, 1 disk" best batch map per
header "targets: files on tmpfs" "bmap/this"
row "bmaptool copy --no-verify" best shm_bmap_nv shm_bmap_nv
row "piprov flash --no-verify (map)" best shm_map_nv shm_bmap_nv
row "piprov flash (map, verified)" best shm_one shm_bmap_nv
row "piprov flash, 4 targets, tmpfs" best shm_four shm_one per
echo "archive: $(du -h "$xz" | cut -f1) of xz -3 ($(xz --robot -l "$xz" | awk '$1 == "totals" { print $3 }') blocks), decoded fresh each run"
header "targets: files, from the .xz" "bmap/this"
row "xz -T0 -dc > /dev/null" best xz_dc xz_bmap_nv
row "bmaptool copy --no-verify" best xz_bmap_nv xz_bmap_nv
row "piprov flash --no-verify" best xz_map_nv xz_bmap_nv
row "bmaptool copy" best xz_bmap xz_bmap
row "piprov flash (verified)" best xz_map xz_bmap

# Card-speed targets: four loop devices, each throttled (cgroup v1 blkio) to
# what a good card in a USB 3 reader does, so the targets are independent, as
# on a bench of card readers, and the batch ratio measures piprov, not this
# machine's two cores copying into tmpfs. dd writes with O_DIRECT and is
# throttled alike; bmaptool is left out here: its buffered writes are flushed
# by the kernel's writeback threads, which a v1 throttle does not hold.
CARD_WRITE_BPS=${CARD_WRITE_BPS:-100000000}
CARD_READ_BPS=${CARD_READ_BPS:-150000000}
CARD_RUNS=${CARD_RUNS:-2}
cg=/sys/fs/cgroup/blkio/piprov-bench
if [ "$(id -u)" != 0 ] || [ ! -w /sys/fs/cgroup/blkio ] || ! command -v losetup >/dev/null; then
    echo "card-speed targets skipped: they need root, losetup and cgroup v1 blkio"
    exit 0
fi
mkdir -p "$cg"
cards=
cleanup() {
    for dev in $cards; do losetup -d "$dev" 2>/dev/null || true; done
    rm -f "$shm"-card*.img
    rmdir "$cg" 2>/dev/null || true
}
trap cleanup EXIT
for n in 1 2 3 4; do
    truncate -s "$(( $(stat -c %s "$img") + (64 << 20) ))" "$shm-card$n.img"
    dev=$(losetup -f --show "$shm-card$n.img")
    cards="$cards $dev"
    eval "card$n=$dev"
    majmin=$(lsblk -dno MAJ:MIN "$dev" | tr -d ' ')
    echo "$majmin $CARD_WRITE_BPS" >"$cg/blkio.throttle.write_bps_device"
    echo "$majmin $CARD_READ_BPS" >"$cg/blkio.throttle.read_bps_device"
done
# throttled COMMAND…: runs it in the cgroup that holds the cards to card speed.
throttled() { sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$cg" "$@"; }
# shellcheck disable=SC2154 # card1…card4 are set by eval above
card_case() {
    case $1 in
    dd) throttled dd if="$img" of="$card1" bs=4M oflag=direct conv=fsync status=none ;;
    one_nv) throttled "$piprov" flash "$img" "$card1" --no-verify --allow-non-removable --yes --quiet ;;
    one) throttled "$piprov" flash "$img" "$card1" --allow-non-removable --yes --quiet ;;
    four) throttled "$piprov" flash "$img" "$card1" "$card2" "$card3" "$card4" --allow-non-removable --yes --quiet ;;
    xz_dc) xz -T0 -dc "$xz" >/dev/null ;;
    xz_one_nv) throttled "$piprov" flash "$xz" "$card1" --no-verify --allow-non-removable --yes --quiet ;;
    xz_one) throttled "$piprov" flash "$xz" "$card1" --allow-non-removable --yes --quiet ;;
    esac
}
time_rounds "$CARD_RUNS" card card_case dd one_nv one four xz_dc xz_one_nv xz_one
echo "card-speed targets: loop devices throttled to $((CARD_WRITE_BPS / 1000000)) MB/s writing, $((CARD_READ_BPS / 1000000)) MB/s reading, $CARD_RUNS rounds, ms"
header "" "dd/this"
row "dd bs=4M oflag=direct conv=fsync" card dd dd
row "piprov flash --no-verify (map)" card one_nv dd
row "piprov flash (map, verified)" card one dd
row "piprov flash, 4 cards" card four one per
# From the archive at card speed, against the slower of its two halves done
# alone: decoding it (xz -T0) and writing the decoded image (piprov, cached).
# shellcheck disable=SC2154 # card_* are set by time_rounds
{
    slower=$card_xz_dc_median
    [ "$card_one_nv_median" -gt "$slower" ] && slower=$card_one_nv_median
    # shellcheck disable=SC2034 # read by row, through eval
    card_alone=$slower card_alone_median=$slower
    header "from the .xz, decoded fresh" "this/alone"
    row "xz -T0 -dc alone" card xz_dc alone per
    row "piprov --no-verify, raw, cached" card one_nv alone per
    row "piprov flash --no-verify (.xz)" card xz_one_nv alone per
    row "piprov flash (.xz, verified)" card xz_one one per
}

# The station at card speed: its own readers and throttle (bench/station.sh).
sh bench/station.sh "$img"

# Capture from a card-speed card against dd | xz (bench/capture.sh).
sh bench/capture.sh "$work"
