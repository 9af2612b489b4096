# shellcheck shell=sh
# shellcheck disable=SC2034 # the variables are for the scripts that source this file
# piprov device side: shared helpers for install.sh, guard.sh and register.sh.
#
# Every path is built from $PIPROV_ROOT (empty on a real card) so the tests can
# run the scripts against a directory that stands in for a card's root.

# POSIX sh has no `local`: every function's variables are global, so each
# function names its own with a prefix where a caller could use the same name.

# The card contract (contract.sh: paths, boot partition names, the clone-state
# list) comes first: the stamp writes the two files as one piprov-lib.sh.
if [ -z "${CARD_CONTRACT:-}" ]; then
    # shellcheck source=firstboot/contract.sh
    . "$(dirname "$0")/contract.sh"
fi

ROOT=${PIPROV_ROOT:-}
LIB_DIR=$ROOT$CARD_LIB_DIR
CONF_DIR=$ROOT$CARD_CONF_DIR
CONF=$CONF_DIR/$BOOT_CONF
STATE_DIR=$ROOT$CARD_STATE_DIR
SECRET=$STATE_DIR/secret.conf
# Temporary files that may hold a secret (a request's headers, the agent's
# output): root-only, scrubbed on exit and at the next start after a kill.
TMP_DIR=$STATE_DIR/tmp
JOURNAL=$STATE_DIR/journal
BINDING=$STATE_DIR/binding
NEEDS_REGISTRATION=$STATE_DIR/needs-registration
PREVIOUS_ID_FILE=$STATE_DIR/previous-instance-id
SSM_DIR=$ROOT$AGENT_DATA_DIR
REGISTRATION_FILE=$ROOT$AGENT_REGISTRATION
KEY_FILE=$ROOT$AGENT_KEY
SUDOERS=$ROOT/etc/sudoers
SUDOERS_D=$ROOT/etc/sudoers.d

log() {
    # stderr reaches the journal under the units' SyslogIdentifier=piprov.
    echo "piprov ${PIPROV_STEP:-}: $*" >&2
}

# The boot partition's mount point: /boot/firmware from Bookworm on, /boot before.
boot_dir() {
    if [ -n "${PIPROV_BOOT:-}" ]; then
        echo "$PIPROV_BOOT"
    elif [ -f "$ROOT/boot/firmware/cmdline.txt" ] || [ -f "$ROOT/boot/firmware/config.txt" ]; then
        echo "$ROOT/boot/firmware"
    else
        echo "$ROOT/boot"
    fi
}

# The keys each file may hold. The settings and the secret are separate files
# with separate keys, so an edited secret file cannot change where the token is
# sent or what sudo allows.
CONF_KEYS='FORMAT SOURCE REGION HOSTNAME_PATTERN STRIP_SSM_USER STRIP_NOPASSWD
NOPASSWD_FILE SSM_USER SUDO_RULE BROKER_URL IMAGE_SHA256 KEEP_TOKEN DEVICE_KEY
DEVICE_KEY_GENERATE KEY_AUTO_ROTATE_DAYS'
SECRET_KEYS='ACTIVATION_ID ACTIVATION_CODE ACTIVATION_REGION BROKER_TOKEN'

# Reads FILE's KEY=VALUE lines into PIPROV_KEY shell variables, for the keys
# listed in KEYS only. Nothing is evaluated and nothing is exported (no child
# process inherits a setting, let alone a secret): the file comes from a FAT
# partition anyone can edit. A line that is not KEY=VALUE with one of those
# keys, a key given twice, or a byte that is not printable ASCII refuses the
# whole file: returns 1 with CONF_ERROR saying why, and sets nothing.
read_conf() {
    conf_file=$1
    conf_keys=" $(printf '%s' "$2" | tr '\n' ' ') "
    CONF_ERROR=
    [ -f "$conf_file" ] || return 0
    # Counted, not captured: the shell drops NUL bytes from what it captures.
    if [ "$(LC_ALL=C tr -d '\n -~' <"$conf_file" | wc -c)" -ne 0 ]; then
        CONF_ERROR="$conf_file holds a control character or a byte that is not ASCII"
        return 1
    fi
    conf_seen=' '
    conf_number=0
    while IFS= read -r line || [ -n "$line" ]; do
        conf_number=$((conf_number + 1))
        case $line in ''|'#'*) continue ;; esac
        key=${line%%=*}
        case $line in
            *=*) ;;
            *) CONF_ERROR="$conf_file line $conf_number is not KEY=value"; return 1 ;;
        esac
        # A name, then one of the listed ones: "SOURCE REGION" would match
        # the list loosely and make eval run a command.
        case $key in
            ''|*[!A-Z0-9_]*) CONF_ERROR="$conf_file line $conf_number: $key is not a setting this file may hold"; return 1 ;;
        esac
        case $conf_keys in
            *" $key "*) ;;
            *) CONF_ERROR="$conf_file line $conf_number: $key is not a setting this file may hold"; return 1 ;;
        esac
        case $conf_seen in
            *" $key "*) CONF_ERROR="$conf_file line $conf_number: $key is given twice"; return 1 ;;
        esac
        conf_seen="$conf_seen$key "
    done <"$conf_file"
    while IFS= read -r line || [ -n "$line" ]; do
        case $line in ''|'#'*) continue ;; esac
        # The key is one of the names above, so this assigns and expands nothing.
        value=${line#*=}
        eval "PIPROV_${line%%=*}=\$value"
    done <"$conf_file"
    return 0
}

# The hardware this card runs on: the SoC serial, which no clone can copy; the
# first MAC address where there is none. Both come from files an attacker with
# the hardware can shape, and end up in sed programs, JSON and file names: a
# value that is not the shape of a serial or a MAC is refused (returns 1), so
# the guard leaves the card as it is and the gate keeps the agent stopped.
hardware_identity() {
    serial=
    if [ -r "$ROOT/sys/firmware/devicetree/base/serial-number" ]; then
        serial=$(tr -d '\000' <"$ROOT/sys/firmware/devicetree/base/serial-number")
    fi
    if [ -z "$serial" ] && [ -r "$ROOT/proc/cpuinfo" ]; then
        serial=$(sed -n 's/^Serial[[:space:]]*:[[:space:]]*//p' "$ROOT/proc/cpuinfo" | head -n 1)
    fi
    if [ -n "$serial" ]; then
        serial=$(printf '%s' "$serial" | tr "[:upper:]" "[:lower:]")
        if ! is_serial "$serial"; then
            log "the serial number is not 8 to 16 hex digits: refusing it"
            return 1
        fi
        echo "serial:$serial"
        return 0
    fi
    mac=$(first_mac)
    if [ -n "$mac" ]; then
        echo "mac:$mac"
        return 0
    fi
    return 1
}

is_serial() {
    case $1 in *[!0-9a-f]*) return 1 ;; esac
    [ "${#1}" -ge 8 ] && [ "${#1}" -le 16 ]
}

is_mac() {
    case $1 in
        [0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]) return 0 ;;
    esac
    return 1
}

# An SSM activation id: a UUID in its 8-4-4-4-12 hex form.
is_uuid() {
    # 36 characters in all, so no second line can hide beside a matching one.
    [ "${#1}" -eq 36 ] || return 1
    uuid_groups=$(printf '%s' "$1" | sed -n 's/^[0-9a-fA-F]\{8\}-[0-9a-fA-F]\{4\}-[0-9a-fA-F]\{4\}-[0-9a-fA-F]\{4\}-[0-9a-fA-F]\{12\}$/ok/p')
    [ "$uuid_groups" = ok ]
}

# The first network interface's MAC address (lower case), skipping loopback,
# all-zero addresses and anything that is not a MAC.
first_mac() {
    for dev in "$ROOT"/sys/class/net/*; do
        [ -r "$dev/address" ] || continue
        [ "${dev##*/}" = lo ] && continue
        mac=$(head -c 64 "$dev/address" | tr "[:upper:]" "[:lower:]")
        [ "$mac" = 00:00:00:00:00:00 ] && continue
        is_mac "$mac" || continue
        echo "$mac"
        return 0
    done
}

# ---- step journal ----------------------------------------------------------
# One line per finished step and hardware identity, so a power cut resumes at
# the first unfinished step and a card moved to other hardware starts afresh.

step_done() {
    grep -qxF "$1 $IDENTITY" "$JOURNAL" 2>/dev/null
}

# Fault injection for the tests: PIPROV_FAILPOINT=step kills the script right
# after that step is journalled, as a power cut would.
mark_done() {
    echo "$1 $IDENTITY" >>"$JOURNAL"
    sync_path "$JOURNAL"
    failpoint "$1"
}

failpoint() {
    if [ "${PIPROV_FAILPOINT:-}" = "$1" ]; then
        log "failpoint $1: stopping here"
        kill -KILL $$
    fi
}

run_step() {
    step=$1
    shift
    if step_done "$step"; then
        log "$step: done on an earlier boot"
        return 0
    fi
    PIPROV_STEP=$step
    "$@"
    mark_done "$step"
}

sync_path() {
    sync "$1" 2>/dev/null || sync
}

# ---- small utilities -------------------------------------------------------

# Writes stdin to a file through a temporary file and a rename, so a cut leaves
# the old file or the new one.
replace_file() {
    tmp="$1.piprov-tmp"
    cat >"$tmp"
    sync_path "$tmp"
    mv -f "$tmp" "$1"
}

# Overwrites a file's bytes in place with zeroes, then removes it. On FAT (and
# ext4) rm only marks the blocks free: whoever takes the card out would read a
# removed secret back with `strings`.
scrub_file() {
    [ -f "$1" ] || return 0
    scrub_size=$(wc -c <"$1" | tr -d ' ')
    if [ "$scrub_size" -gt 0 ]; then
        dd if=/dev/zero of="$1" bs="$scrub_size" count=1 conv=notrunc,fsync status=none ||
            log "could not overwrite $1 before removing it"
    fi
    rm -f "$1"
    sync_path "${1%/*}"
}

# A new empty file in TMP_DIR; prints its path.
private_tmp() {
    mkdir -p "$TMP_DIR"
    chmod 700 "$TMP_DIR"
    mktemp "$TMP_DIR/XXXXXX"
}

# Scrubs whatever a run left in TMP_DIR (a kill leaves its files behind).
scrub_tmp() {
    for leftover in "$TMP_DIR"/*; do
        scrub_file "$leftover"
    done
}

json_escape() {
    printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g' | tr -d '\n\r'
}

# The value of a "key":"value" pair in flat JSON (the agent's and the broker's).
json_value() {
    sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\\([^\"]*\\)\".*/\\1/p" | head -n 1
}

# The value of KEY in a flat JSON FILE; empty when the file is missing. (The
# braces matter: a redirect that fails is reported before `2>` applies.)
json_file_value() {
    [ -f "$2" ] || return 0
    { json_value "$1" <"$2"; } 2>/dev/null
}

# The mi- id the agent would speak as now: the one in its key. The agent's
# `-register -clear` and a refused registration leave the key holding no id
# (and `registration` holding the old one), so `registration` says nothing.
current_instance_id() {
    json_file_value instanceID "$KEY_FILE" | grep -x 'mi-[0-9a-f]*' || true
}

# The mi- id the card was last registered as (the golden's, on a golden).
last_registered_id() {
    json_file_value ManagedInstanceID "$REGISTRATION_FILE"
}

random_hex() {
    od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'
}

now_utc() {
    date -u +%Y-%m-%dT%H:%M:%SZ
}

# Writes the outcome where `piprov inspect` reads it from the workstation, and
# into the state directory.
write_status() {
    status_state=$1
    status_message=$2
    status_boot=$(boot_dir)
    status_json="{\"state\":\"$status_state\",\"message\":\"$(json_escape "$status_message")\",\"identity\":\"$(json_escape "${IDENTITY:-}")\",\"instance_id\":\"$(current_instance_id)\",\"previous_instance_id\":\"$(cat "$PREVIOUS_ID_FILE" 2>/dev/null)\",\"hostname\":\"$(cat "$ROOT/etc/hostname" 2>/dev/null)\",\"time\":\"$(now_utc)\"}"
    mkdir -p "$STATE_DIR"
    printf '%s\n' "$status_json" | replace_file "$STATE_DIR/status.json"
    if [ -d "$status_boot" ]; then
        printf '%s\n' "$status_json" >"$status_boot/$BOOT_STATUS" || log "cannot write $BOOT_STATUS on the boot partition"
    fi
}

# Capped exponential backoff with jitter, in whole seconds:
# min(cap, base * 2^attempt) plus up to half of that again.
backoff_delay() {
    backoff_n=$1
    base=${PIPROV_BACKOFF_BASE:-5}
    cap=${PIPROV_BACKOFF_CAP:-300}
    delay=$base
    i=0
    while [ "$i" -lt "$backoff_n" ] && [ "$delay" -lt "$cap" ]; do
        delay=$((delay * 2))
        i=$((i + 1))
    done
    [ "$delay" -gt "$cap" ] && delay=$cap
    jitter=0
    if [ "${PIPROV_BACKOFF_JITTER:-1}" = 1 ] && [ "$delay" -gt 1 ]; then
        jitter=$(( $(od -An -N2 -tu2 /dev/urandom | tr -d ' ') % (delay / 2 + 1) ))
    fi
    echo $((delay + jitter))
}
