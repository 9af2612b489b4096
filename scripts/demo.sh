#!/bin/sh
# The main job end to end on this machine: build a 4 GiB golden image taken from an
# already-registered Pi, then audit it the way a user would before cloning it.
set -eu
cd "$(dirname "$0")/.."
piprov=target/release/piprov
mkdir -p demo

echo "== building a 4 GiB golden image from a registered Pi (demo/golden.img)"
tests/fixtures/make-image.sh --variant registered --size 4096 demo/golden.img

echo "== piprov inspect demo/golden.img"
start=$(date +%s%N)
status=0
"$piprov" inspect demo/golden.img || status=$?
end=$(date +%s%N)
echo "(exit status $status: 1 means risky findings; inspect took $(( (end - start) / 1000000 )) ms)"

echo "== the same as JSON, findings only"
"$piprov" inspect --json demo/golden.img | python3 -c '
import json, sys
for f in json.load(sys.stdin)["findings"]:
    print(f["severity"].ljust(8), f["id"])
' || true
