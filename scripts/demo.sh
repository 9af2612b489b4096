#!/bin/sh
# What piprov is for, end to end on this machine, without root: the card of a
# Pi that was set up and already registered is captured as a golden archive
# (read as an image file here; a card is /dev/sdX), audited, stamped and flashed to three
# card images, each with its own activation from SSM (a local SSM-compatible
# endpoint on loopback, the one the tests use). Each card's first boot runs: the
# device scripts on the card's root, with the amazon-ssm-agent stand-in. A fourth
# card is a `dd` copy of card 1, booted in another Pi. Then every card's identity
# side by side with the golden's: no value is shared.
set -eu
cd "$(dirname "$0")/.."
here=$(pwd)
piprov=$here/target/release/piprov
demo=$here/demo
rm -rf "$demo"
mkdir -p "$demo"

# ---- the SSM side: an SSM-compatible endpoint on loopback ------------------
. scripts/local-ssm.sh
local_ssm "$demo"
trap 'kill "$ssm_pid" 2>/dev/null || true' EXIT

echo "== a Pi that was set up and registered: its card (demo/pi-card.img; on a workstation, /dev/sdX)"
tests/fixtures/make-image.sh --variant registered --size 1024 "$demo/pi-card.img"

echo
echo "== piprov capture demo/pi-card.img demo/golden.img.xz: only what is used, the root shrunk"
# Exit status 1: captured, and the audit has findings (this golden's are why piprov exists).
"$piprov" capture "$demo/pi-card.img" "$demo/golden.img.xz" >"$demo/capture.txt" || [ $? -eq 1 ]
sed -n '1,3p' "$demo/capture.txt"
stat -c '%s %n' "$demo"/golden.img.*

echo
echo "== piprov inspect demo/golden.img.xz: what every dd copy of it would share"
"$piprov" inspect "$demo/golden.img.xz" | grep -E '^(CRITICAL|WARNING)' || true

echo
echo "== piprov flash: three cards, each stamped with its own activation (recipe demo/fleet.toml)"
cat >"$demo/fleet.toml" <<'RECIPE'
name = "demo-fleet"
region = "eu-west-1"
iam_role = "SSMServiceRole"
hostname = "door-{serial}"

[activation]
source = "embedded"
expires = "2h"
RECIPE
"$piprov" flash "$demo/golden.img.xz" "$demo/card1.img" "$demo/card2.img" "$demo/card3.img" \
    --recipe "$demo/fleet.toml" --yes --quiet
echo "3 cards written and verified; SSM now holds $(grep -c CreateActivation "$demo/ssm.log") single-use activations"

# ---- a card's root, as a Pi sees it --------------------------------------
# partition N of IMAGE: its first sector and its length in sectors
extent() {
    sfdisk -d "$1" | sed -n "s/^[^ ]*$2 : start= *\([0-9]*\), size= *\([0-9]*\).*/\1 \2/p"
}
unpack() { # IMAGE DIR
    root_extent=$(extent "$1" 2)
    boot_start=$(extent "$1" 1 | cut -d' ' -f1)
    mkdir -p "$2/boot/firmware"
    dd if="$1" of="$2.root.part" bs=512 skip="${root_extent% *}" count="${root_extent#* }" status=none
    debugfs -R "rdump / $2" "$2.root.part" >/dev/null 2>&1
    rm -f "$2.root.part"
    mcopy -s -n -i "$1@@$((boot_start * 512))" ::/ "$2/boot/firmware"
}
# The Pi a card is plugged into: its SoC serial, its MAC, the endpoint.
plug() { # ROOT SERIAL MAC
    mkdir -p "$1/sys/firmware/devicetree/base" "$1/sys/class/net/eth0" "$1/etc/amazon/ssm"
    printf '%s\000' "$2" >"$1/sys/firmware/devicetree/base/serial-number"
    echo "$3" >"$1/sys/class/net/eth0/address"
    printf '{"Ssm":{"Endpoint":"%s"}}\n' "$endpoint" >"$1/etc/amazon/ssm/amazon-ssm-agent.json"
}
on_card() { # ROOT SCRIPT: a device script, as the card's boot runs it (its journal: ROOT.journal)
    PIPROV_ROOT=$1 PATH="$here/tests/standins:$PATH" STANDIN_LOG="$1.agent.log" \
        PIPROV_BACKOFF_BASE=0 PIPROV_MAX_ATTEMPTS=3 sh "$1$2" 2>>"$1.journal"
}
status() { sed -n 's/.*"state":"\([^"]*\)","message":"\([^"]*\)".*/\1: \2/p' "$1/boot/firmware/piprov-status.json"; }
first_boot() {
    on_card "$1" /boot/firmware/piprov-install.sh
    on_card "$1" /usr/local/lib/piprov/guard.sh
    on_card "$1" /usr/local/lib/piprov/register.sh
}

echo
echo "== first boots: each card in its own Pi"
unpack "$demo/pi-card.img" "$demo/golden"
for n in 1 2 3; do
    unpack "$demo/card$n.img" "$demo/card$n"
    plug "$demo/card$n" "10000000d3a0000$n" "dc:a6:32:00:00:0$n"
    first_boot "$demo/card$n"
    echo "card $n: $(status "$demo/card$n")"
done
echo
echo "== card 4: card 1 copied byte for byte after its first boot (dd), booted in another Pi"
cp -a "$demo/card1" "$demo/card4"
plug "$demo/card4" 10000000d3a00004 dc:a6:32:00:00:04
on_card "$demo/card4" /usr/local/lib/piprov/guard.sh
on_card "$demo/card4" /usr/local/lib/piprov/register.sh
echo "card 4: $(status "$demo/card4")"
echo "   (its guard wiped card 1's registration, keys and machine-id: its agent stays down)"
echo "== the operator gives card 4 a fresh activation on its boot partition; it registers on its next boot"
"$piprov" activation create --role SSMServiceRole --json --show-code >"$demo/card4-activation.json"
python3 -c '
import json, sys
a = json.load(open(sys.argv[1]))
print("ACTIVATION_ID=%s\nACTIVATION_CODE=%s\nACTIVATION_REGION=eu-west-1" % (a["activation_id"], a["activation_code"]))
' "$demo/card4-activation.json" >"$demo/card4/boot/firmware/piprov-secret.conf"
rm -f "$demo/card4-activation.json"
on_card "$demo/card4" /usr/local/lib/piprov/register.sh
echo "card 4: $(status "$demo/card4")"

# ---- side by side -----------------------------------------------------------
instance() { sed -n 's/.*"instanceID":"\([^"]*\)".*/\1/p' "$1/var/lib/amazon/ssm/Vault/Store/RegistrationKey"; }
host_key() { ssh-keygen -lf "$1/etc/ssh/ssh_host_ed25519_key.pub" | cut -d' ' -f2 | cut -c8-23; }
serial() {
    file=$1/sys/firmware/devicetree/base/serial-number
    if [ -f "$file" ]; then tr -d '\000' <"$file"; else echo "-"; fi
}
sudo_rules() {
    rules=
    grep -qs NOPASSWD "$1/etc/sudoers.d/010_pi-nopasswd" && rules="pi NOPASSWD"
    grep -qs NOPASSWD "$1/etc/sudoers.d/ssm-agent-users" && rules="${rules:+$rules, }ssm-user NOPASSWD"
    echo "${rules:-none passwordless}"
}
echo
echo "== who is who"
table=$demo/identities.txt
printf '%-7s %-17s %-20s %-33s %-17s %s\n' card serial "mi- id" machine-id "ssh host key" "sudo" >"$table"
for card in golden card1 card2 card3 card4; do
    root=$demo/$card
    printf '%-7s %-17s %-20s %-33s %-17s %s\n' "$card" "$(serial "$root")" "$(instance "$root")" \
        "$(cat "$root/etc/machine-id")" "$(host_key "$root")" "$(sudo_rules "$root")" >>"$table"
done
cat "$table"
# Columns 3 to 5 are the identity: every value appears on one row only.
shared=$(awk 'NR > 1 { for (i = 3; i <= 5; i++) print $i }' "$table" | sort | uniq -d)
if [ -n "$shared" ]; then
    echo "shared between cards: $shared" >&2
    exit 1
fi
echo "no mi- id, machine-id or SSH host key is shared: each card is its own managed node"
golden_id=$(instance "$demo/golden")
as_golden=$(grep -c "$golden_id" "$demo/ssm.log" || true)
[ "$as_golden" -eq 0 ] || { echo "SSM heard $as_golden requests naming the golden's $golden_id" >&2; exit 1; }
echo "SSM never heard from the golden's $golden_id: no card spoke as it"
