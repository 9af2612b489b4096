#!/bin/sh
# The bench, on this machine (needs root: loop devices and the kernel's uevents).
# Three card readers are loop devices over empty files; a card is "pushed in" by
# filling the file and having the kernel read its capacity again (it raises the
# same `change` event a USB reader raises). `piprov station` writes each card as
# it arrives, with its own number, hostname and activation from SSM (a local
# SSM-compatible endpoint on loopback); a card too small is refused; the page is
# at http://127.0.0.1:8080/ while it runs. Then the record, and the next
# morning's question: did every card come up? (None has booted here.)
set -eu
cd "$(dirname "$0")/.."
here=$(pwd)
piprov=$here/target/release/piprov
demo=$here/demo/station
port=${STATION_DEMO_PORT:-8080}
if [ "$(id -u)" != 0 ]; then
    echo "station-demo needs root: loop devices stand in for card readers" >&2
    exit 2
fi
rm -rf "$demo"
mkdir -p "$demo"
readers=
station_pid=
cleanup() {
    [ -z "$station_pid" ] || kill "$station_pid" 2>/dev/null || true
    for dev in $readers; do losetup -d "$dev" 2>/dev/null || true; done
    kill "$ssm_pid" 2>/dev/null || true
}
. scripts/local-ssm.sh
local_ssm "$demo"
trap cleanup EXIT

echo "== a golden image and a bench recipe"
tests/fixtures/make-image.sh --variant golden --size 256 "$demo/golden.img"
bench_recipe "$demo/bench.toml"

echo "== three card readers (loop devices, empty: no card in them)"
reader() { # N: a reader over an empty file
    : >"$demo/reader$1"
    losetup -f --show "$demo/reader$1" 2>/dev/null
}
dev1=$(reader 1)
readers=$dev1
dev2=$(reader 2)
readers="$readers $dev2"
dev3=$(reader 3)
readers="$readers $dev3"
echo "readers: $readers"

"$piprov" station "$demo/golden.img" --recipe "$demo/bench.toml" --hostname 'door-{number}' \
    --record "$demo/station.db" --listen "127.0.0.1:$port" --allow-non-removable \
    --match "$dev1" --match "$dev2" --match "$dev3" --json >"$demo/events.jsonl" 2>"$demo/station.log" &
station_pid=$!
for _ in $(seq 1 300); do
    grep -q "page is at" "$demo/station.log" 2>/dev/null && break
    sleep 0.1
done
echo "the bench's page: http://127.0.0.1:$port/"

# card FILE SIZE: a used card of SIZE MiB (old data on it)
card() { head -c "$(($2 << 20))" /dev/urandom >"$1"; }
push() { # READER-NUMBER DEVICE CARD-FILE
    cp "$3" "$demo/reader$1"
    losetup -c "$2"
}
wait_for() { # DEVICE STATE
    for _ in $(seq 1 600); do
        grep -q "\"device\":\"$1\".*\"state\":\"$2\"" "$demo/events.jsonl" && return 0
        sleep 0.1
    done
    echo "$1 never reached $2" >&2
    cat "$demo/station.log" >&2
    exit 1
}

echo
echo "== cards pushed into the readers, two seconds apart; nothing typed"
card "$demo/card-a" 272
card "$demo/card-b" 272
card "$demo/card-c" 100
push 1 "$dev1" "$demo/card-a"
sleep 2
push 2 "$dev2" "$demo/card-b"
sleep 2
push 3 "$dev3" "$demo/card-c"
wait_for "$dev1" "done"
wait_for "$dev2" "done"
wait_for "$dev3" "refused"
sed -n 's/.*"device":"\([^"]*\)".*"hostname":\([^,]*\),.*"state":"\([^"]*\)".*/\1 \2 \3/p' "$demo/events.jsonl"

kill -TERM "$station_pid"
wait "$station_pid" || true
station_pid=

echo
echo "== piprov station record"
"$piprov" station record --record "$demo/station.db"
echo
echo "== piprov fleet reconcile --record: the next morning (no card has booted here)"
"$piprov" fleet reconcile --record "$demo/station.db" || echo "(exit status $?: cards flagged)"
