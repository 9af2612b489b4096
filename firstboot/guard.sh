#!/bin/sh
# piprov guard: runs on every boot before amazon-ssm-agent, without network.
# When the hardware is not the one this card is bound to (first boot of a golden
# image, or a card cloned into another Pi) it takes away everything the card
# shares with its siblings and marks the card for registration.
#
# `guard.sh --gate` is the agent's ExecCondition: it lets the agent start only
# when the card is bound to this hardware. `guard.sh --after-failure` is the
# guard unit's ExecStopPost: a failed guard says so on the boot partition.
set -eu
# shellcheck source=/dev/null
. "$(dirname "$0")/lib.sh"

stop_agent() {
    systemctl stop amazon-ssm-agent.service 2>/dev/null || true
    systemctl stop snap.amazon-ssm-agent.amazon-ssm-agent.service 2>/dev/null || true
}

remember_previous_instance() {
    mkdir -p "$STATE_DIR"
    previous=$(last_registered_id)
    printf '%s\n' "$previous" | replace_file "$PREVIOUS_ID_FILE"
    [ -n "$previous" ] && log "the image carries the registration of $previous: wiping it"
    return 0
}

wipe_identity() {
    # The agent's own clear empties the key and fingerprint; it leaves
    # `registration` behind, so the files go by hand as well.
    if command -v amazon-ssm-agent >/dev/null 2>&1; then
        amazon-ssm-agent -register -clear >/dev/null 2>&1 || log "amazon-ssm-agent -register -clear failed; deleting the files directly"
    fi
    rm -f "$ROOT$AGENT_REGISTRATION" "$ROOT$AGENT_MANIFEST" "$ROOT$AGENT_KEY" "$ROOT$AGENT_FINGERPRINT"
    rm -rf "${ROOT}$AGENT_RUNTIME_CONFIG"
    for dir in "$SSM_DIR"/mi-*; do
        [ -d "$dir" ] && rm -rf "$dir"
    done
    drop_shared_credentials
    log "SSM identity wiped"
}

# The agent shares its role credentials as [default] in /root/.aws/credentials;
# other profiles there belong to someone else and stay.
drop_shared_credentials() {
    creds=$ROOT$AGENT_SHARED_CREDENTIALS
    [ -f "$creds" ] || return 0
    awk '/^\[/ { skip = ($0 == "[default]") } !skip' "$creds" | replace_file "$creds"
    chmod 600 "$creds"
    [ -s "$creds" ] || rm -f "$creds"
}

new_machine_id() {
    random_hex 16 | replace_file "$ROOT/etc/machine-id"
    echo >>"$ROOT/etc/machine-id"
    chmod 444 "$ROOT/etc/machine-id"
    mkdir -p "$ROOT/var/lib/dbus"
    rm -f "$ROOT/var/lib/dbus/machine-id"
    ln -s /etc/machine-id "$ROOT/var/lib/dbus/machine-id"
    log "new machine-id"
}

new_ssh_host_keys() {
    [ -d "$ROOT/etc/ssh" ] || return 0
    rm -f "$ROOT"/etc/ssh/ssh_host_*
    if command -v ssh-keygen >/dev/null 2>&1; then
        ssh-keygen -A -f "${ROOT:-/}" >/dev/null
        log "new SSH host keys"
    else
        log "ssh-keygen missing: sshd will make host keys on its first start"
    fi
}

# A card larger than the image it was written from (a captured golden is cut
# after its root partition) gets the rest: the root partition grows to the
# card's end, then its ext4 with it, online. cloud-init's growpart where the
# image has it; else sfdisk (a GPT's backup header moved to the card's end
# first) and partx to tell the kernel. Each half does nothing once done, so a
# cut mid-way resumes; a card that cannot grow keeps working at its size.
grow_root() {
    part=${PIPROV_ROOT_PARTITION:-}
    if [ -z "$part" ]; then
        if [ -n "$ROOT" ]; then
            log "grow: no root partition named under a test root: nothing to grow"
            return 0
        fi
        part=$(findmnt -no SOURCE /) || { log "grow: cannot tell the root's device: not grown"; return 0; }
    fi
    sys=/sys/class/block/${part##*/}
    if [ ! -r "$sys/partition" ]; then
        log "grow: $part is not a partition: not grown"
        return 0
    fi
    number=$(cat "$sys/partition")
    disk=/dev/$(basename "$(readlink -f "$sys/..")")
    if command -v growpart >/dev/null 2>&1; then
        # Exit status 1: nothing to grow.
        rc=0
        growpart "$disk" "$number" >&2 || rc=$?
        [ "$rc" -le 1 ] || { log "grow: growpart $disk $number failed ($rc): not grown"; return 0; }
    else
        if sfdisk -d "$disk" 2>/dev/null | grep -q '^label: gpt'; then
            sfdisk --no-reread -q --relocate gpt-bak-std "$disk" >&2 ||
                { log "grow: cannot move the GPT's backup header to the end of $disk: not grown"; return 0; }
        fi
        echo ', +' | sfdisk --no-reread --no-tell-kernel -q -N "$number" "$disk" >&2 ||
            { log "grow: sfdisk could not grow partition $number of $disk: not grown"; return 0; }
        partx -u -n "$number" "$disk" >&2 || { log "grow: the kernel did not take the new size of $part"; return 0; }
    fi
    # A cut here leaves the partition grown and its filesystem not: the next
    # boot runs the step again, and only the filesystem has growing to do.
    failpoint grow_partition
    resize2fs "$part" >&2 || { log "grow: resize2fs $part failed: the filesystem keeps its size"; return 0; }
    log "grow: $part fills $disk"
}

# Files no two machines should share: the contract's CLONE_STATE list, which
# `piprov inspect` reports from the same source.
forget_clone_state() {
    # The list is split into patterns without globbing (that would glob the
    # running system's paths); each pattern is then globbed inside $ROOT.
    set -f
    for pattern in $CLONE_STATE; do
        set +f
        for path in "$ROOT"$pattern; do
            [ -e "$path" ] || [ -L "$path" ] || continue
            rm -f "$path"
            log "removed ${path#"$ROOT"}"
        done
        set -f
    done
    set +f
}

set_hostname() {
    pattern=${PIPROV_HOSTNAME_PATTERN:-}
    [ -n "$pattern" ] || return 0
    serial=${IDENTITY#serial:}
    [ "$serial" = "$IDENTITY" ] && serial=
    mac=$(first_mac | tr -d ':')
    name=$(printf '%s' "$pattern" | sed "s/{serial}/$serial/g; s/{mac}/$mac/g" | tr '[:upper:]' '[:lower:]')
    # One DNS label (RFC 1123): 1 to 63 of a-z, 0-9 and -, no - at either end.
    # Anything else is logged and the current name kept: a name the kernel
    # refuses must not stop the boot, let alone every later one.
    case $name in
        ''|-*|*-|*[!a-z0-9-]*)
            log "hostname pattern gives '$name', not a valid hostname: keeping the current one"
            return 0 ;;
    esac
    if [ "${#name}" -gt 63 ]; then
        log "hostname pattern gives ${#name} characters, more than a hostname may have (63): keeping the current one"
        return 0
    fi
    old=$(cat "$ROOT/etc/hostname" 2>/dev/null || true)
    printf '%s\n' "$name" | replace_file "$ROOT/etc/hostname"
    if [ -f "$ROOT/etc/hosts" ]; then
        sed "s/^127\.0\.1\.1[[:space:]].*/127.0.1.1\t$name/" "$ROOT/etc/hosts" | replace_file "$ROOT/etc/hosts"
        grep -q '^127\.0\.1\.1' "$ROOT/etc/hosts" || printf '127.0.1.1\t%s\n' "$name" >>"$ROOT/etc/hosts"
    fi
    if [ -z "$ROOT" ]; then
        hostname "$name" 2>/dev/null || log "the kernel refused hostname $name; it takes effect on the next boot"
    fi
    log "hostname ${old:-unset} -> $name"
}

# The whole sudo policy, as sudo would read it: the main file and every file in
# sudoers.d that sudo includes (no dot in the name, no trailing ~).
check_sudo_policy() {
    policy=$(mktemp)
    grep -v '^[@#]include' "$SUDOERS" >"$policy" 2>/dev/null || true
    for f in "$SUDOERS_D"/*; do
        case ${f##*/} in *.*|*~) continue ;; esac
        [ -f "$f" ] && cat "$f" >>"$policy"
    done
    visudo -c -q -f "$policy" >/dev/null 2>&1
    ok=$?
    rm -f "$policy"
    return $ok
}

# Takes away ssm-user's passwordless root and the default user's NOPASSWD.
# Every change is checked with visudo against the whole policy: the stripping is
# rolled back as a whole if the policy no longer parses, and a replacement rule
# from the recipe is only kept if it parses alone and with everything else.
harden_sudo() {
    ssm_user=${PIPROV_SSM_USER:-ssm-user}
    backup=$STATE_DIR/sudoers.d.backup
    rm -rf "$backup"
    mkdir -p "$SUDOERS_D"
    cp -a "$SUDOERS_D" "$backup"

    if [ "${PIPROV_STRIP_SSM_USER:-1}" = 1 ]; then
        # A file with only this comment is never rewritten by the agent
        # (the AWS-documented way to keep ssm-user out of sudo).
        printf '#User rules for %s\n' "$ssm_user" | replace_file "$ROOT$AGENT_SUDOERS"
        chmod 440 "$ROOT$AGENT_SUDOERS"
        log "ssm-user sudo stripped"
    fi
    if [ "${PIPROV_STRIP_NOPASSWD:-1}" = 1 ]; then
        nopasswd=${PIPROV_NOPASSWD_FILE:-010_pi-nopasswd}
        case $nopasswd in
            */*|.*) log "refusing NOPASSWD file name $nopasswd" ;;
            *) if [ -f "$SUDOERS_D/$nopasswd" ]; then
                   rm -f "$SUDOERS_D/$nopasswd"
                   log "$nopasswd removed"
               fi ;;
        esac
    fi
    if ! check_sudo_policy; then
        log "sudo policy does not parse after hardening: rolling back sudoers.d"
        rm -rf "$SUDOERS_D"
        cp -a "$backup" "$SUDOERS_D"
        rm -rf "$backup"
        return 0
    fi
    rm -rf "$backup"
    if [ "${PIPROV_STRIP_SSM_USER:-1}" = 1 ]; then
        remove_from_admin_groups "$ssm_user"
    fi

    if [ -n "${PIPROV_SUDO_RULE:-}" ]; then
        candidate=$(mktemp)
        printf '%s\n' "$PIPROV_SUDO_RULE" >"$candidate"
        if ! visudo -c -q -f "$candidate" >/dev/null 2>&1; then
            log "the recipe's sudo rule does not parse (visudo -c): not installed"
        else
            replace_file "$SUDOERS_D/piprov-users" <"$candidate"
            chmod 440 "$SUDOERS_D/piprov-users"
            if check_sudo_policy; then
                log "replacement sudo rule installed"
            else
                rm -f "$SUDOERS_D/piprov-users"
                log "the recipe's sudo rule conflicts with the image's sudoers (visudo -c): taken back"
            fi
        fi
        rm -f "$candidate"
    fi
}

remove_from_admin_groups() {
    user=$1
    for file in "$ROOT/etc/group" "$ROOT/etc/gshadow"; do
        [ -f "$file" ] || continue
        mode=$(stat -c %a "$file")
        awk -F: -v OFS=: -v user="$user" '
            $1 == "sudo" || $1 == "admin" || $1 == "wheel" {
                n = split($NF, members, ","); out = ""
                for (i = 1; i <= n; i++) if (members[i] != user) out = out (out == "" ? "" : ",") members[i]
                $NF = out
            }
            { print }' "$file" | replace_file "$file"
        chmod "$mode" "$file"
    done
}

# Profile.KeyAutoRotateDays in the agent's config, every other setting kept: the
# agent then replaces its private key every N days (a clone that still shared a
# key with its original would break it at the next rotation). JSON edited as
# text, so only the shapes the agent's own config takes: the key present (its
# template has it), a Profile object without it, or no Profile at all.
set_key_rotation() {
    days=${PIPROV_KEY_AUTO_ROTATE_DAYS:-}
    [ -n "$days" ] || return 0
    case $days in *[!0-9]*) log "KEY_AUTO_ROTATE_DAYS=$days is not a number: left alone"; return 0 ;; esac
    config=$ROOT$AGENT_CONFIG
    mkdir -p "$(dirname "$config")"
    text=$(tr '\n' ' ' <"$config" 2>/dev/null || true)
    case $text in
        *[![:space:]]*) ;;
        *) text='{}' ;;
    esac
    if printf '%s' "$text" | grep -q '"KeyAutoRotateDays"[[:space:]]*:'; then
        text=$(printf '%s' "$text" | sed "s/\"KeyAutoRotateDays\"[[:space:]]*:[[:space:]]*[0-9]*/\"KeyAutoRotateDays\": $days/")
    elif printf '%s' "$text" | grep -q '"Profile"[[:space:]]*:[[:space:]]*{[[:space:]]*}'; then
        text=$(printf '%s' "$text" | sed "s/\"Profile\"[[:space:]]*:[[:space:]]*{[[:space:]]*}/\"Profile\": {\"KeyAutoRotateDays\": $days}/")
    elif printf '%s' "$text" | grep -q '"Profile"[[:space:]]*:[[:space:]]*{'; then
        text=$(printf '%s' "$text" | sed "s/\"Profile\"[[:space:]]*:[[:space:]]*{/\"Profile\": {\"KeyAutoRotateDays\": $days, /")
    elif printf '%s' "$text" | grep -q '^[[:space:]]*{[[:space:]]*}[[:space:]]*$'; then
        text="{\"Profile\": {\"KeyAutoRotateDays\": $days}}"
    else
        text=$(printf '%s' "$text" | sed "s/^[[:space:]]*{/{\"Profile\": {\"KeyAutoRotateDays\": $days}, /")
    fi
    printf '%s\n' "$text" | replace_file "$config"
    chmod 644 "$config"
    log "the agent rotates its private key every $days days"
}

mark_needs_registration() {
    mkdir -p "$STATE_DIR"
    : >"$NEEDS_REGISTRATION"
    sync_path "$NEEDS_REGISTRATION"
    write_status pending "identity renewed on $IDENTITY; waiting to register"
}

# Keeps the agent stopped (ExecCondition exit 1) and says why on the boot partition.
block_agent() {
    log "amazon-ssm-agent kept stopped: $1"
    write_status blocked "amazon-ssm-agent kept stopped: $1"
    exit 1
}

# The settings file, or the agent kept stopped when it is refused.
read_settings_or_block() {
    read_conf "$CONF" "$CONF_KEYS" || block_agent "the card's settings are refused: $CONF_ERROR"
}

# The agent's ExecCondition: exit 0 only when the binding matches this
# hardware, this machine-id and the id the agent would speak as.
gate() {
    export PIPROV_STEP=gate
    read_settings_or_block
    IDENTITY=$(hardware_identity) || block_agent "cannot tell which hardware this is"
    if [ -f "$NEEDS_REGISTRATION" ]; then
        # piprov-register starts the agent once the card has its own identity.
        log "waiting for this card's own registration: the agent starts after it"
        exit 1
    fi
    [ -f "$BINDING" ] ||
        block_agent "the card is not bound to this hardware ($IDENTITY): the guard did not finish (journalctl -u piprov-guard)"
    bound_to=$(sed -n 's/^identity=//p' "$BINDING")
    [ "$bound_to" = "$IDENTITY" ] ||
        block_agent "the card is bound to $bound_to, not to this hardware ($IDENTITY): the guard did not renew its identity (journalctl -u piprov-guard)"
    bound_machine_id=$(sed -n 's/^machine_id=//p' "$BINDING")
    [ "$bound_machine_id" = "$(tr -d '\n' <"$ROOT/etc/machine-id" 2>/dev/null)" ] ||
        block_agent "/etc/machine-id is not the one the card was bound with"
    bound_id=$(sed -n 's/^instance_id=//p' "$BINDING")
    current=$(current_instance_id)
    if [ -z "$current" ] || [ "$current" != "$bound_id" ]; then
        block_agent "the agent holds ${current:-no registration}, not $bound_id, the id this card was bound to"
    fi
    exit 0
}

# The guard unit's ExecStopPost: a guard that failed or was killed says so on
# the boot partition (systemd sets SERVICE_RESULT, EXIT_CODE, EXIT_STATUS).
# Its `systemctl stop` of the agent has cancelled the agent's start for this
# boot, and the agent's gate keeps it stopped until a guard completes.
after_failure() {
    [ "${SERVICE_RESULT:-success}" = success ] && exit 0
    export PIPROV_STEP=guard
    IDENTITY=$(hardware_identity) || IDENTITY=
    read_settings_or_block
    block_agent "the guard did not finish (${SERVICE_RESULT}${EXIT_STATUS:+: $EXIT_STATUS}); it resumes on the next boot (journalctl -u piprov-guard)"
}

main() {
    case ${1:-} in
        --gate) gate ;;
        --after-failure) after_failure ;;
    esac
    export PIPROV_STEP=guard
    read_settings_or_block
    if ! IDENTITY=$(hardware_identity); then
        log "cannot tell which hardware this is (no serial number, no MAC): leaving the card as it is"
        exit 0
    fi
    if [ -f "$BINDING" ] && grep -qxF "identity=$IDENTITY" "$BINDING"; then
        log "bound to this hardware ($IDENTITY): nothing to do"
        exit 0
    fi
    log "$IDENTITY is not the hardware this card is bound to: renewing its identity"
    mkdir -p "$STATE_DIR"
    chmod 700 "$STATE_DIR"
    run_step stop_agent stop_agent
    run_step remember_previous remember_previous_instance
    run_step wipe_identity wipe_identity
    run_step grow_root grow_root
    run_step new_machine_id new_machine_id
    run_step new_ssh_keys new_ssh_host_keys
    run_step forget_clone_state forget_clone_state
    run_step set_hostname set_hostname
    run_step harden_sudo harden_sudo
    run_step agent_settings set_key_rotation
    run_step mark_registration mark_needs_registration
}

main "$@"
