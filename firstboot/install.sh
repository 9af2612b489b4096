#!/bin/sh
# piprov install: the first-boot hook. Runs from the boot partition, either from
# the kernel command line (systemd.run=, Bookworm) or from a cloud-init
# boothook (Trixie, with --now). Installs the guard and register units into the
# root filesystem, moves the secret off the FAT partition and removes its own
# hook.
#
# systemd.run powers the Pi off when the script fails, so it always exits 0 and
# leaves a bootable card: whatever goes wrong is logged and the boot carries on.
set -u
BOOT_SELF=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=/dev/null
. "$BOOT_SELF/piprov-lib.sh"
PIPROV_BOOT=${PIPROV_BOOT:-$BOOT_SELF}
export PIPROV_BOOT

# Payload on the boot partition -> place in the root filesystem.
install_payload() {
    mkdir -p "$LIB_DIR" "$CONF_DIR" "$STATE_DIR" "$ROOT/etc/systemd/system"
    chmod 700 "$STATE_DIR"
    for name in lib guard register; do
        cp "$PIPROV_BOOT/piprov-$name.sh" "$LIB_DIR/$name.sh.new"
        chmod 755 "$LIB_DIR/$name.sh.new"
        mv -f "$LIB_DIR/$name.sh.new" "$LIB_DIR/$name.sh"
    done
    for unit in piprov-guard.service piprov-register.service; do
        cp "$PIPROV_BOOT/$unit" "$ROOT/etc/systemd/system/$unit"
        chmod 644 "$ROOT/etc/systemd/system/$unit"
    done
    # Keep the agent from starting while the card waits for its own registration.
    for agent_unit in amazon-ssm-agent.service snap.amazon-ssm-agent.amazon-ssm-agent.service; do
        mkdir -p "$ROOT/etc/systemd/system/$agent_unit.d"
        cp "$PIPROV_BOOT/piprov-agent.conf" "$ROOT/etc/systemd/system/$agent_unit.d/piprov.conf"
        # Files on a FAT mount read as executable; systemd warns about such units.
        chmod 644 "$ROOT/etc/systemd/system/$agent_unit.d/piprov.conf"
    done
    if [ -f "$PIPROV_BOOT/piprov-card.7" ]; then
        mkdir -p "$ROOT/usr/local/share/man/man7"
        cp "$PIPROV_BOOT/piprov-card.7" "$ROOT/usr/local/share/man/man7/piprov-card.7"
        chmod 644 "$ROOT/usr/local/share/man/man7/piprov-card.7"
    fi
    cp "$PIPROV_BOOT/$BOOT_CONF" "$CONF"
    chmod 644 "$CONF"
    if [ -f "$PIPROV_BOOT/$BOOT_CA" ]; then
        cp "$PIPROV_BOOT/$BOOT_CA" "$CONF_DIR/broker-ca.pem"
        chmod 644 "$CONF_DIR/broker-ca.pem"
    fi
    if [ -f "$PIPROV_BOOT/$BOOT_SECRET" ]; then
        (umask 077 && cat "$PIPROV_BOOT/$BOOT_SECRET" >"$SECRET.new")
        sync_path "$SECRET.new"
        mv -f "$SECRET.new" "$SECRET"
        scrub_file "$PIPROV_BOOT/$BOOT_SECRET"
    fi
    log "payload installed"
}

# What `systemctl enable` does, done by hand: it works in the minimal
# kernel-command-line.target boot and in a directory standing in for a card.
enable_units() {
    wants=$ROOT/etc/systemd/system/multi-user.target.wants
    mkdir -p "$wants"
    for unit in piprov-guard.service piprov-register.service; do
        ln -sf "/etc/systemd/system/$unit" "$wants/$unit"
    done
}

remove_payload_from_boot() {
    for name in piprov-lib.sh piprov-guard.sh piprov-register.sh piprov-guard.service \
        piprov-register.service piprov-agent.conf "$BOOT_CONF" "$BOOT_CA" piprov-install.sh; do
        rm -f "$PIPROV_BOOT/$name"
    done
}

# Takes out exactly the tokens `piprov stamp` appended; the rest of the line
# stays byte for byte.
remove_hook_tokens() {
    cmdline=$PIPROV_BOOT/cmdline.txt
    [ -f "$cmdline" ] || return 0
    grep -q 'piprov-install\.sh' "$cmdline" || return 0
    sed 's# systemd\.run=[^ ]*/piprov-install\.sh##; s# systemd\.run_success_action=reboot##; s# systemd\.unit=kernel-command-line\.target##' \
        "$cmdline" | replace_file "$cmdline"
    log "first-boot hook removed from cmdline.txt"
}

main() {
    export PIPROV_STEP=install
    install_payload
    enable_units
    remove_hook_tokens
    write_status installed "piprov installed; the guard runs next"
    remove_payload_from_boot
    sync
    if [ "${1:-}" = --now ]; then
        # A cloud-init boothook, in the init stage of a normal boot: before
        # network-online.target, so before amazon-ssm-agent. The reload makes
        # the agent's drop-in count for this boot; the guard runs now rather
        # than after a reboot; registration waits for the network as usual.
        systemctl daemon-reload
        systemctl start piprov-guard.service
        systemctl start --no-block piprov-register.service
    fi
}

( set -e; main "$@" )
status=$?
if [ "$status" -ne 0 ]; then
    log "install failed (status $status); the card boots on without piprov"
    remove_hook_tokens || true
fi
exit 0
