#!/bin/sh
# piprov install: the first-boot hook. Runs from the boot partition, either from
# the kernel command line (systemd.run=, Bookworm) or from a cloud-init
# boothook (Trixie, with --now). Installs the guard and register units into the
# root filesystem, moves the secret off the FAT partition and removes its own
# hook.
#
# It fails closed from its first instruction: before anything else it holds
# amazon-ssm-agent with a drop-in that lets the agent start only once a
# complete install has written $CARD_INSTALLED. A step that fails leaves the
# agent held (the golden's registration never speaks), a `failed` status on the
# boot partition naming the step, no secret on the FAT, and no hook: the card
# boots on, plainly not provisioned, until it is stamped again. Only when the
# hold itself cannot be written is the agent masked for the boot instead, and
# the hook kept (see hold_this_boot). systemd.run
# powers the Pi off when the script fails, so it always exits 0.
# shellcheck disable=SC2317 # the steps are called through step(), which shellcheck cannot follow
set -u
if [ -z "${CARD_CONTRACT:-}" ]; then
    # shellcheck source=firstboot/contract.sh
    . "$(dirname "$0")/contract.sh"
fi
BOOT_SELF=$(cd "$(dirname "$0")" && pwd)
PIPROV_BOOT=${PIPROV_BOOT:-$BOOT_SELF}
export PIPROV_BOOT
INSTALL_ROOT=${PIPROV_ROOT:-}
AGENT_UNITS="amazon-ssm-agent.service snap.amazon-ssm-agent.amazon-ssm-agent.service"

# Holds the agent until $CARD_INSTALLED exists. Needs nothing from the boot
# partition but this script, so nothing that can be missing there lets the
# agent start as the golden.
hold_agent() {
    for agent_unit in $AGENT_UNITS; do
        hold_dir=$INSTALL_ROOT/etc/systemd/system/$agent_unit.d
        mkdir -p "$hold_dir" || return 1
        printf '%s\n' \
            "# piprov: amazon-ssm-agent starts only on a card piprov installed completely." \
            "[Unit]" "ConditionPathExists=$CARD_INSTALLED" >"$hold_dir/piprov-hold.conf" || return 1
        chmod 644 "$hold_dir/piprov-hold.conf" || return 1
    done
    sync
}

# When the drop-in itself cannot be written (a root filesystem gone read-only,
# or full), nothing on the root can hold the agent across boots: it is masked
# in /run for this boot, and the hook stays (fail() keeps it, without its
# reboot) so that every boot runs this script and holds the agent again, until
# the card is stamped again or its root can be written.
HOLD_STEP="holding amazon-ssm-agent"
hold_this_boot() {
    runtime_dir=$INSTALL_ROOT/run/systemd/system
    mkdir -p "$runtime_dir"
    for agent_unit in $AGENT_UNITS; do
        ln -sf /dev/null "$runtime_dir/$agent_unit"
    done
    systemctl daemon-reload 2>/dev/null
    for agent_unit in $AGENT_UNITS; do
        systemctl stop "$agent_unit" 2>/dev/null
    done
    echo "piprov install: amazon-ssm-agent masked for this boot; the hook stays" >&2
}

# Bookworm's hook without its reboot: the Pi stays in the first-boot target,
# where the agent does not run, and says why on the boot partition.
keep_hook_without_reboot() {
    cmdline=$PIPROV_BOOT/cmdline.txt
    [ -f "$cmdline" ] || return 0
    sed 's# systemd\.run_success_action=reboot##' "$cmdline" >"$cmdline.piprov-tmp" &&
        mv -f "$cmdline.piprov-tmp" "$cmdline"
}

# Takes out exactly the tokens `piprov stamp` appended; the rest of the line
# stays byte for byte. Uses nothing from piprov-lib.sh: it runs after any failure.
remove_hook_tokens() {
    cmdline=$PIPROV_BOOT/cmdline.txt
    [ -f "$cmdline" ] || return 0
    grep -q 'piprov-install\.sh' "$cmdline" || return 0
    sed 's# systemd\.run=[^ ]*/piprov-install\.sh##; s# systemd\.run_success_action=reboot##; s# systemd\.unit=kernel-command-line\.target##' \
        "$cmdline" >"$cmdline.piprov-tmp" && mv -f "$cmdline.piprov-tmp" "$cmdline"
    echo "piprov install: first-boot hook removed from cmdline.txt" >&2
}

# The end of a failed install (see the top of this file).
fail() {
    echo "piprov install: failed while $1; amazon-ssm-agent stays stopped" >&2
    secret=$PIPROV_BOOT/$BOOT_SECRET
    if [ -f "$secret" ]; then
        # Zeroes over its clusters first: rm alone leaves the code readable on FAT.
        dd if=/dev/zero of="$secret" bs="$(wc -c <"$secret")" count=1 conv=notrunc,fsync status=none 2>/dev/null
        rm -f "$secret"
    fi
    printf '{"state":"failed","message":"piprov could not install (failed while %s): amazon-ssm-agent is held stopped and the activation secret was removed; stamp the card again","time":"%s"}\n' \
        "$1" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$PIPROV_BOOT/$BOOT_STATUS" ||
        echo "piprov install: cannot write $BOOT_STATUS on the boot partition" >&2
    if [ "$1" = "$HOLD_STEP" ]; then
        hold_this_boot
        keep_hook_without_reboot
    else
        remove_hook_tokens
    fi
    sync
    exit 0
}

# Runs one step in a subshell with `set -e`; a failure ends the install. (Not
# `( … ) || fail`: the shell ignores `set -e` anywhere left of a `||`.)
step() {
    step_name=$1
    shift
    ( set -e; "$@" )
    step_status=$?
    [ "$step_status" -eq 0 ] || fail "$step_name"
}

# The settings and the secret are read on the card with the strict reader;
# one it would refuse later is refused now, before anything is installed.
check_settings() {
    read_conf "$PIPROV_BOOT/$BOOT_CONF" "$CONF_KEYS" || { log "$CONF_ERROR"; return 1; }
    [ -f "$PIPROV_BOOT/$BOOT_SECRET" ] || return 0
    read_conf "$PIPROV_BOOT/$BOOT_SECRET" "$SECRET_KEYS" || { log "$CONF_ERROR"; return 1; }
}

install_scripts() {
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
    # The gate: the agent starts only on a card bound to this hardware.
    for agent_unit in $AGENT_UNITS; do
        cp "$PIPROV_BOOT/piprov-agent.conf" "$ROOT/etc/systemd/system/$agent_unit.d/piprov.conf"
        # Files on a FAT mount read as executable; systemd warns about such units.
        chmod 644 "$ROOT/etc/systemd/system/$agent_unit.d/piprov.conf"
    done
    if [ -f "$PIPROV_BOOT/piprov-card.7" ]; then
        mkdir -p "$ROOT/usr/local/share/man/man7"
        cp "$PIPROV_BOOT/piprov-card.7" "$ROOT/usr/local/share/man/man7/piprov-card.7"
        chmod 644 "$ROOT/usr/local/share/man/man7/piprov-card.7"
    fi
}

install_settings() {
    cp "$PIPROV_BOOT/$BOOT_CONF" "$CONF"
    chmod 644 "$CONF"
    if [ -f "$PIPROV_BOOT/$BOOT_CA" ]; then
        cp "$PIPROV_BOOT/$BOOT_CA" "$CONF_DIR/broker-ca.pem"
        chmod 644 "$CONF_DIR/broker-ca.pem"
    fi
}

move_secret() {
    [ -f "$PIPROV_BOOT/$BOOT_SECRET" ] || return 0
    # shellcheck disable=SC2153 # SECRET comes from piprov-lib.sh
    (umask 077 && cat "$PIPROV_BOOT/$BOOT_SECRET" >"$SECRET.new")
    sync_path "$SECRET.new"
    mv -f "$SECRET.new" "$SECRET"
    scrub_file "$PIPROV_BOOT/$BOOT_SECRET"
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

mark_installed() {
    date -u +%Y-%m-%dT%H:%M:%SZ | replace_file "$ROOT$CARD_INSTALLED"
    log "payload installed"
}

remove_payload_from_boot() {
    for name in piprov-lib.sh piprov-guard.sh piprov-register.sh piprov-guard.service \
        piprov-register.service piprov-agent.conf "$BOOT_CONF" "$BOOT_CA" piprov-install.sh; do
        rm -f "$PIPROV_BOOT/$name"
    done
}

main() {
    step "$HOLD_STEP" hold_agent
    # Loaded in a subshell first: a missing or broken file would end this shell.
    # shellcheck source=/dev/null
    ( . "$PIPROV_BOOT/piprov-lib.sh" ) >/dev/null 2>&1 || fail "loading piprov-lib.sh"
    # shellcheck source=/dev/null
    . "$PIPROV_BOOT/piprov-lib.sh"
    export PIPROV_STEP=install
    step "checking the card's settings" check_settings
    step "installing the scripts and units" install_scripts
    step "installing the settings" install_settings
    step "moving the secret off the boot partition" move_secret
    step "enabling the units" enable_units
    step "marking the card installed" mark_installed
    remove_hook_tokens
    write_status installed "piprov installed; the guard runs next"
    remove_payload_from_boot
    sync
    if [ "${1:-}" = --now ]; then
        # A cloud-init boothook, in the init stage of a normal boot: before
        # network-online.target, so before amazon-ssm-agent. The reload makes
        # the agent's drop-ins count for this boot; the guard runs now rather
        # than after a reboot; registration waits for the network as usual.
        systemctl daemon-reload
        systemctl start piprov-guard.service
        systemctl start --no-block piprov-register.service
    fi
}

main "$@"
exit 0
