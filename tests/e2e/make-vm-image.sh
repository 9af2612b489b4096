#!/bin/sh
# An arm64 disk image laid out like Raspberry Pi OS (MBR; FAT32 "bootfs" mounted
# at /boot/firmware holding kernel8.img, initramfs8, config.txt and cmdline.txt;
# ext4 "rootfs") from the debootstrap root filesystem, with a `pi` user and 010_pi-nopasswd, the
# amazon-ssm-agent stand-in and its unit, registered once through the local SSM
# endpoint, as a golden image taken from a working Pi would be. A root with
# cloud-init (trixie) gets a NoCloud seed on bootfs, as Pi OS Trixie has it.
#
#   make-vm-image.sh ROOTFS.tar OUT.img HOST_ENDPOINT GUEST_ENDPOINT ACTIVATION_ID CODE_FILE
#
# HOST_ENDPOINT is the SSM endpoint as this machine reaches it (for the golden's
# registration), GUEST_ENDPOINT as the guest does (QEMU user networking forwards
# 10.0.2.2 to this machine's loopback). Prints the golden's mi- id.
set -eu
[ $# -eq 6 ] || { echo "usage: make-vm-image.sh ROOTFS.tar OUT.img HOST_ENDPOINT GUEST_ENDPOINT ACTIVATION_ID CODE_FILE" >&2; exit 2; }
tarball=$1 out=$2 host_endpoint=$3 guest_endpoint=$4 activation_id=$5 code_file=$6
here=$(cd "$(dirname "$0")" && pwd)
standins=$here/../standins

work=$(mktemp -d "${TMPDIR:-/var/tmp}/piprov-vm.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
boot=$work/boot
mkdir -p "$root" "$boot"
tar --numeric-owner -C "$root" -xf "$tarball"
disk_id=$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')

# ---- the system, as on a Pi ----------------------------------------------
echo raspberrypi >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\traspberrypi\n' >"$root/etc/hosts"
cat >"$root/etc/fstab" <<FSTAB
PARTUUID=$disk_id-01  /boot/firmware  vfat  defaults          0  2
PARTUUID=$disk_id-02  /               ext4  defaults,noatime  0  1
FSTAB
mkdir -p "$root/boot/firmware"
echo "Raspberry Pi reference 2024-11-19" >"$root/etc/rpi-issue"
# Host tools working on the root (no arm64 program runs here).
useradd --root "$root" -m -s /bin/bash -G sudo pi
echo 'pi ALL=(ALL) NOPASSWD: ALL' >"$root/etc/sudoers.d/010_pi-nopasswd"
chmod 0440 "$root/etc/sudoers.d/010_pi-nopasswd"
# The golden Pi was used with Session Manager: the agent made ssm-user and its rule.
useradd --root "$root" -m -s /bin/sh -G sudo ssm-user
printf '# User rules for ssm-user\nssm-user ALL=(ALL) NOPASSWD:ALL\n' >"$root/etc/sudoers.d/ssm-agent-users"
chmod 0440 "$root/etc/sudoers.d/ssm-agent-users"
# A machine-id of its own, as a Pi that has booted has.
od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$root/etc/machine-id"
echo >>"$root/etc/machine-id"

cat >"$root/etc/systemd/network/20-wired.network" <<'NET'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
NET
systemctl --root="$root" enable systemd-networkd.service systemd-networkd-wait-online.service ssh.service >/dev/null 2>&1

# ---- amazon-ssm-agent: the stand-in, its unit, its endpoint ---------------
install -m 0755 "$standins/amazon-ssm-agent" "$root/usr/bin/amazon-ssm-agent"
# rpi-fw-crypto as on a Pi 4/5; each simulated board's key is in its device tree.
install -m 0755 "$standins/rpi-fw-crypto" "$root/usr/bin/rpi-fw-crypto"
# The service speaks to SSM as the real daemon does whenever it starts: under
# the instance id in its key (the files a clone carries decide who it is).
cat >"$root/usr/local/bin/ssm-agent-service" <<'PING'
#!/bin/sh
endpoint=$(sed -n 's/.*"Endpoint" *: *"\([^"]*\)".*/\1/p' /etc/amazon/ssm/amazon-ssm-agent.json)
while :; do
    id=$(sed -n 's/.*"instanceID":"\([^"]*\)".*/\1/p' /var/lib/amazon/ssm/Vault/Store/RegistrationKey 2>/dev/null)
    if [ -n "$id" ]; then
        ip=$(ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 | head -n 1)
        curl -s --max-time 10 -H 'X-Amz-Target: AmazonSSM.UpdateInstanceInformation' \
            -H 'Content-Type: application/x-amz-json-1.1' \
            --data "{\"InstanceId\":\"$id\",\"AgentVersion\":\"3.3.987.0\",\"ComputerName\":\"$(hostname)\",\"IPAddress\":\"$ip\",\"PlatformName\":\"Debian GNU/Linux\",\"PlatformType\":\"Linux\"}" \
            "$endpoint/" >/dev/null || true
    fi
    sleep 30
done
PING
chmod 0755 "$root/usr/local/bin/ssm-agent-service"
cat >"$root/lib/systemd/system/amazon-ssm-agent.service" <<'UNIT'
[Unit]
Description=amazon-ssm-agent
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart=/usr/local/bin/ssm-agent-service
Restart=always
RestartSec=90

[Install]
WantedBy=multi-user.target
UNIT
systemctl --root="$root" enable amazon-ssm-agent.service >/dev/null 2>&1
mkdir -p "$root/etc/amazon/ssm" "$root/var/lib/amazon/ssm"
printf '{"Ssm":{"Endpoint":"%s"}}\n' "$host_endpoint" >"$root/etc/amazon/ssm/amazon-ssm-agent.json"
amazon_out=$(PIPROV_ROOT=$root sh "$standins/amazon-ssm-agent" -register -y \
    -id "$activation_id" -code "$(cat "$code_file")" -region eu-west-1)
printf '{"Ssm":{"Endpoint":"%s"}}\n' "$guest_endpoint" >"$root/etc/amazon/ssm/amazon-ssm-agent.json"

# ---- test harness: power off once the card has settled --------------------
# Not part of what piprov does: it lets the test know a boot is over. It waits
# for piprov's register step (if the card is stamped), then for a status that is
# no longer pending, and powers off.
cat >"$root/usr/local/bin/e2e-settle" <<'SETTLE'
#!/bin/sh
for _ in $(seq 1 150); do
    state=$(sed -n 's/.*"state":"\([^"]*\)".*/\1/p' /boot/firmware/piprov-status.json 2>/dev/null)
    case $state in registered|failed|needs-activation|blocked) break ;; esac
    [ -e /boot/firmware/piprov-stamp.json ] || break
    sleep 1
done
# What the card's disk and root are now, for the test (a captured image grows
# to fill the card on its first boot): the guest's own lsblk and df.
part=$(findmnt -no SOURCE /)
disk=/dev/$(lsblk -ndo PKNAME "$part")
{
    lsblk -b -o NAME,SIZE,TYPE,MOUNTPOINTS "$disk"
    df -B1 /
    echo "e2e-grow: disk $(lsblk -bdno SIZE "$disk") root-partition $(lsblk -bdno SIZE "$part") root-fs $(df -B1 --output=size / | tail -n 1)"
} >/dev/console 2>&1 || true
sync
systemctl poweroff
SETTLE
chmod 0755 "$root/usr/local/bin/e2e-settle"
cat >"$root/etc/systemd/system/e2e-settle.service" <<'UNIT'
[Unit]
Description=End-to-end test: power off once the card has settled
After=multi-user.target piprov-register.service

[Service]
Type=oneshot
ExecStart=/usr/local/bin/e2e-settle

[Install]
WantedBy=multi-user.target
UNIT
systemctl --root="$root" enable e2e-settle.service >/dev/null 2>&1
# A test can make a card's guard fail: PIPROV_FAILPOINT=STEP in e2e-failpoint
# on its boot partition kills the guard after that step, as a crash would.
mkdir -p "$root/etc/systemd/system/piprov-guard.service.d"
printf '[Service]\nEnvironmentFile=-/boot/firmware/e2e-failpoint\n' \
    >"$root/etc/systemd/system/piprov-guard.service.d/e2e-failpoint.conf"

# ---- boot partition: the "firmware" reads config.txt, cmdline.txt, kernel and initramfs
cp "$root"/boot/vmlinuz-*-arm64 "$boot/kernel8.img"
cp "$root"/boot/initrd.img-*-arm64 "$boot/initramfs8"
# ttyAMA0: the PL011 UART, on a Pi as on QEMU's virt machine.
printf 'console=ttyAMA0,115200 root=PARTUUID=%s-02 rootfstype=ext4 fsck.repair=yes rootwait\n' "$disk_id" >"$boot/cmdline.txt"
printf '# Raspberry Pi config.txt\narm_64bit=1\nkernel=kernel8.img\ninitramfs initramfs8 followkernel\n' >"$boot/config.txt"
head -c 16384 /dev/urandom >"$boot/start4.elf"
head -c 8192 /dev/urandom >"$boot/bcm2711-rpi-4-b.dtb"
echo "Raspberry Pi reference 2024-11-19" >"$boot/issue.txt"
if [ -x "$root/usr/bin/cloud-init" ]; then
    # Pi OS Trixie: the NoCloud seed sits on the FAT partition labelled bootfs.
    # Networking stays with systemd-networkd, as configured above.
    cat >"$root/etc/cloud/cloud.cfg.d/99_raspberry-pi.cfg" <<'CFG'
datasource_list: [ NoCloud, None ]
datasource:
  NoCloud:
    fs_label: bootfs
network:
  config: disabled
CFG
    printf '#cloud-config\nmanage_etc_hosts: false\n' >"$boot/user-data"
    printf 'instance-id: rpi-golden\n' >"$boot/meta-data"
fi

# ---- assemble ----------------------------------------------------------------
boot_start=8192
boot_mib=256
size_mib=2048
root_start=$((boot_start + boot_mib * 2048))
root_sectors=$((size_mib * 2048 - root_start))
rm -f "$out"
truncate -s "${size_mib}M" "$out"
sfdisk --quiet "$out" <<PARTS
label: dos
label-id: 0x$disk_id
start=$boot_start, size=$((boot_mib * 2048)), type=c
start=$root_start, size=$root_sectors, type=83
PARTS
# shellcheck source=tests/fixtures/filesystems.sh
. "$here/../fixtures/filesystems.sh"
write_filesystems "$out" "$work" "$boot" "$root" "$boot_start" "$boot_mib" "$root_start" "$root_sectors"
echo "$amazon_out" | sed -n 's/.*Managed instance-id: \(mi-[0-9a-f]*\).*/\1/p'
