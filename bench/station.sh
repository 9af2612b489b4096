#!/bin/sh
# The station at card speed: four card readers (loop devices over files, held
# to card speed by a cgroup v1 blkio throttle, as in run.sh), `piprov station`
# already running, one card pushed in alone, then four pushed in two seconds
# apart. Per card: the time from its push (the kernel's `change` uevent) to its
# first byte written, and from its push to "done" (written and verified),
# against the card's physical time (its bytes at the write speed plus the same
# bytes read back at the read speed); and the four in flight against the one
# alone. Needs root.
#
#   bench/station.sh IMAGE      (run by bench/run.sh, with its 2 GiB image)
set -eu
cd "$(dirname "$0")/.."
img=$1
piprov=$PWD/target/release/piprov
CARD_WRITE_BPS=${CARD_WRITE_BPS:-100000000}
CARD_READ_BPS=${CARD_READ_BPS:-150000000}
if [ "$(id -u)" != 0 ] || [ ! -w /sys/fs/cgroup/blkio ]; then
    echo "station case skipped: it needs root and cgroup v1 blkio"
    exit 0
fi
work=$(mktemp -d /var/tmp/piprov-station-bench.XXXXXX)
cg=/sys/fs/cgroup/blkio/piprov-station-bench
mkdir -p "$cg"
readers=
station_pid=
cleanup() {
    [ -z "$station_pid" ] || kill "$station_pid" 2>/dev/null || true
    for dev in $readers; do losetup -d "$dev" 2>/dev/null || true; done
    [ -z "${ssm_pid:-}" ] || kill "$ssm_pid" 2>/dev/null || true
    rmdir "$cg" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

. scripts/local-ssm.sh
local_ssm "$work"
bench_recipe "$work/bench.toml"

card_bytes=$(( $(stat -c %s "$img") + (64 << 20) ))
for n in 1 2 3 4; do
    : >"$work/reader$n"
    dev=$(losetup -f --show "$work/reader$n" 2>/dev/null)
    readers="$readers $dev"
    majmin=$(lsblk -dno MAJ:MIN "$dev" | tr -d ' ')
    echo "$majmin $CARD_WRITE_BPS" >"$cg/blkio.throttle.write_bps_device"
    echo "$majmin $CARD_READ_BPS" >"$cg/blkio.throttle.read_bps_device"
done
# shellcheck disable=SC2086 # one word per reader
set -- $readers
matches=
for dev in "$@"; do matches="$matches --match $dev"; done

mkfifo "$work/events"
# The station, in the throttled cgroup; each JSON line stamped as it arrives.
# shellcheck disable=SC2086 # one word per option
sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$cg" "$piprov" station "$img" \
    --recipe "$work/bench.toml" --hostname 'bench-{number}' --record "$work/station.db" \
    --allow-non-removable --again --json $matches >"$work/events" 2>"$work/station.log" &
station_pid=$!
while IFS= read -r line; do
    printf '%s %s\n' "$(date +%s%N)" "$line"
done <"$work/events" >"$work/stamped" &
for _ in $(seq 1 1200); do
    grep -q "writing .* to every card" "$work/station.log" 2>/dev/null && break
    sleep 0.1
done

# A used card in reader N: old data, its first MiB too (the first write
# shows there, wiped first).
load() {
    truncate -s 0 "$work/reader$1"
    truncate -s "$card_bytes" "$work/reader$1"
    head -c 1048576 /dev/urandom >"$work/head$1"
    dd if="$work/head$1" of="$work/reader$1" conv=notrunc status=none
}
# push N DEVICE: the card goes in; its first byte written is timed apart.
push() {
    date +%s%N >"$work/pushed$1"
    losetup -c "$2"
    (
        while cmp -s -n 4096 "$work/reader$1" "$work/head$1"; do sleep 0.005; done
        date +%s%N >"$work/first$1"
    ) &
}
# out N DEVICE: the card is taken out.
out() {
    truncate -s 0 "$work/reader$1"
    losetup -c "$2"
}
# wait_done DEVICE COUNT: until the station has said "done" COUNT times for it.
wait_done() {
    for _ in $(seq 1 3000); do
        [ "$(grep -c "\"device\":\"$1\".*\"state\":\"done\"" "$work/stamped" 2>/dev/null)" -ge "$2" ] && return 0
        grep -q "\"device\":\"$1\".*\"state\":\"failed\"" "$work/stamped" && break
        sleep 0.1
    done
    echo "$1 did not finish:" >&2
    cat "$work/stamped" "$work/station.log" >&2
    exit 1
}
# report LABEL N DEVICE COUNT: one line for reader N's COUNT-th card.
report() {
    done_at=$(grep "\"device\":\"$3\".*\"state\":\"done\"" "$work/stamped" | sed -n "$4p")
    done_ns=${done_at%% *}
    bytes=$(printf '%s' "$done_at" | sed -n 's/.*"bytes":\([0-9]*\).*/\1/p')
    pushed=$(cat "$work/pushed$2")
    first=$(cat "$work/first$2")
    physical_ms=$(( bytes * 1000 / CARD_WRITE_BPS + bytes * 1000 / CARD_READ_BPS ))
    took_ms=$(( (done_ns - pushed) / 1000000 ))
    printf '%-8s %8s %16d %14d %12d %9s\n' "$1" "$(( bytes >> 20 ))MiB" \
        "$(( (first - pushed) / 1000000 ))" "$took_ms" "$physical_ms" \
        "$(awk -v a="$took_ms" -v b="$physical_ms" 'BEGIN { printf "%.2f", a / b }')"
    eval "took_$1=$took_ms"
}

echo "station: readers throttled to $((CARD_WRITE_BPS / 1000000)) MB/s writing, $((CARD_READ_BPS / 1000000)) MB/s reading; ms"
printf '%-8s %8s %16s %14s %12s %9s\n' card bytes "push→1st byte" "push→done" physical ratio
load 1
push 1 "$1"
wait_done "$1" 1
report alone 1 "$1" 1
out 1 "$1"
for n in 1 2 3 4; do load "$n"; done
n=0
for dev in "$@"; do
    n=$((n + 1))
    push "$n" "$dev"
    [ "$n" = 4 ] || sleep 2
done
n=0
for dev in "$@"; do
    n=$((n + 1))
    count=1
    [ "$n" = 1 ] && count=2
    wait_done "$dev" "$count"
    report "card$n" "$n" "$dev" "$count"
done
# shellcheck disable=SC2154 # took_* are set by report, through eval
{
slowest=$(printf '%s\n' "$took_card1" "$took_card2" "$took_card3" "$took_card4" | sort -n | tail -n 1)
echo "4 cards in flight, the slowest against one alone: $(awk -v a="$slowest" -v b="$took_alone" 'BEGIN { printf "%.2f", a / b }')x"
}
