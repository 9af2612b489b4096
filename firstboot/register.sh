#!/bin/sh
# piprov register: runs after network-online when the guard marked the card.
# Gets a fresh activation, registers the agent, confirms the new mi- id, binds the
# card to this hardware and removes every secret. Offline or broker down: retries
# with capped exponential backoff and jitter.
set -eu
# shellcheck source=/dev/null
. "$(dirname "$0")/lib.sh"

RETRY=1
FAILED=2
# Why the last attempt failed, for the status when the retries run out.
RETRY_CAUSE=

# A secret file dropped on the boot partition (by piprov stamp, or by an operator
# re-activating a card cloned in the field) moves into the root-only state dir.
adopt_boot_secret() {
    boot=$(boot_dir)
    [ -f "$boot/$BOOT_SECRET" ] || return 0
    mkdir -p "$STATE_DIR"
    (umask 077 && cat "$boot/$BOOT_SECRET" >"$SECRET.new")
    sync_path "$SECRET.new"
    scrub_file "$SECRET"
    mv -f "$SECRET.new" "$SECRET"
    scrub_file "$boot/$BOOT_SECRET"
    log "activation secret taken from the boot partition"
}

scrub_secrets() {
    boot=$(boot_dir)
    scrub_file "$SECRET.new"
    scrub_file "$boot/$BOOT_SECRET"
    if [ "${PIPROV_SOURCE:-}" = broker ] && [ "${PIPROV_KEEP_TOKEN:-0}" = 1 ] && [ -n "${PIPROV_BROKER_TOKEN:-}" ]; then
        # The site chose to keep the enrollment token (root-only), so that a copy
        # of this card booted in another Pi can enrol through the broker. It only
        # ever obtains single-use activations; the activation code itself goes.
        (umask 077 && printf 'BROKER_TOKEN=%s\n' "$PIPROV_BROKER_TOKEN" >"$SECRET.new")
        sync_path "$SECRET.new"
        scrub_file "$SECRET"
        mv -f "$SECRET.new" "$SECRET"
    else
        scrub_file "$SECRET"
    fi
    unset PIPROV_ACTIVATION_CODE PIPROV_ACTIVATION_ID PIPROV_BROKER_TOKEN
    sync
}

# What the broker knows this hardware by: the Pi serial, or the MAC without colons.
broker_serial() {
    case $IDENTITY in
        serial:*) echo "${IDENTITY#serial:}" ;;
        *) echo "${IDENTITY#*:}" | tr -d ':' ;;
    esac
}

# POSTs JSON to the broker with the pinned CA; the token goes in a header file,
# never on a command line other users can read. EXTRA_HEADERS: a file of more
# header lines (the device proof), or empty. The reply goes to stdout; on an
# HTTP error the broker's own message goes to the journal, and to BROKER_REFUSAL
# through the file $BROKER_REFUSAL_FILE (this runs in a subshell).
broker_post() {
    path=$1
    body=$2
    ca=$CONF_DIR/broker-ca.pem
    headers=$(private_tmp)
    printf 'Authorization: Bearer %s\nContent-Type: application/json\n' "$PIPROV_BROKER_TOKEN" >"$headers"
    [ -n "${EXTRA_HEADERS:-}" ] && cat "$EXTRA_HEADERS" >>"$headers"
    post_rc=0
    if command -v curl >/dev/null 2>&1; then
        reply=$(private_tmp)
        code=$(curl -sS --max-time 30 --cacert "$ca" -H "@$headers" --data "$body" \
            -o "$reply" -w '%{http_code}' "$PIPROV_BROKER_URL$path") || post_rc=$?
        case $post_rc:$code in
            0:2??) cat "$reply" ;;
            0:*)
                post_rc=22
                refusal="the broker refused ($code): $(json_value error <"$reply")"
                log "$refusal"
                printf '%s\n' "$refusal" >"$BROKER_REFUSAL_FILE" ;;
        esac
        scrub_file "$reply"
    elif command -v wget >/dev/null 2>&1; then
        rc=$(private_tmp)
        sed 's/^/header = /' "$headers" >"$rc"
        # wget adds --ca-certificate to the system's store, so any public CA
        # could certify a server for the broker's name. An empty --ca-directory
        # replaces the store: only the pinned CA is trusted, as with curl.
        no_store=$STATE_DIR/no-ca-store
        rm -rf "$no_store"
        mkdir -m 700 "$no_store"
        wget -q -O - --timeout=30 --config="$rc" --ca-directory="$no_store" --ca-certificate="$ca" \
            --post-data="$body" "$PIPROV_BROKER_URL$path" || post_rc=$?
        scrub_file "$rc"
    else
        log "neither curl nor wget is installed: cannot reach the broker"
        post_rc=127
    fi
    scrub_file "$headers"
    return $post_rc
}

# The Pi's OTP device key (rpi-fw-crypto, key 1), when the recipe asks for it:
# DEVICE_PUBKEY is the hex of its DER public key, or empty with DEVICE_NOTE
# saying why. The private key is never read; a blank slot gets a key only when
# the recipe says so, since that writes OTP for good.
device_key_ready() {
    DEVICE_PUBKEY=
    DEVICE_NOTE=
    [ "${PIPROV_DEVICE_KEY:-0}" = 1 ] || return 0
    if ! command -v rpi-fw-crypto >/dev/null 2>&1; then
        DEVICE_NOTE="no usable device key: rpi-fw-crypto is not installed"
        log "$DEVICE_NOTE"
        return 0
    fi
    err=$(private_tmp)
    if ! rpi-fw-crypto get-key-status 1 >"$err" 2>&1; then
        DEVICE_NOTE="no usable device key: rpi-fw-crypto get-key-status 1 failed ($(tail -n 1 "$err"))"
        scrub_file "$err"
        log "$DEVICE_NOTE"
        return 0
    fi
    log "device key: $(head -n 1 "$err")"
    if ! DEVICE_PUBKEY=$(rpi-fw-crypto pubkey --key-id 1 --outform hex 2>"$err"); then
        DEVICE_PUBKEY=
        if [ "${PIPROV_DEVICE_KEY_GENERATE:-0}" = 1 ] && grep -q 'Last crypto error: 6 ' "$err"; then
            log "key slot 1 is blank: writing a new device key into OTP, as the recipe asks (permanent)"
            if rpi-fw-crypto genkey --key-id 1 --alg ec >"$err" 2>&1; then
                log "rpi-fw-crypto: $(tail -n 1 "$err")"
                DEVICE_PUBKEY=$(rpi-fw-crypto pubkey --key-id 1 --outform hex 2>"$err") || DEVICE_PUBKEY=
            fi
        fi
    fi
    if [ -z "$DEVICE_PUBKEY" ]; then
        DEVICE_NOTE="no usable device key: rpi-fw-crypto pubkey --key-id 1 failed ($(tail -n 1 "$err"))"
        log "$DEVICE_NOTE"
    fi
    scrub_file "$err"
}

# Signs BODY with the device key; writes the proof headers to EXTRA_HEADERS.
sign_request() {
    message=$(private_tmp)
    signature=$(private_tmp)
    printf 'piprov-enrollment-v1\n%s' "$1" >"$message"
    sign_rc=0
    rpi-fw-crypto sign --in "$message" --key-id 1 --alg ec --outform hex --out "$signature" 2>&1 | while IFS= read -r line; do log "rpi-fw-crypto: $line"; done
    [ -s "$signature" ] || sign_rc=1
    if [ "$sign_rc" -eq 0 ]; then
        EXTRA_HEADERS=$(private_tmp)
        printf 'X-Piprov-Device-Key: %s\nX-Piprov-Device-Signature: %s\n' "$DEVICE_PUBKEY" "$(cat "$signature")" >"$EXTRA_HEADERS"
    fi
    scrub_file "$message"
    scrub_file "$signature"
    return $sign_rc
}

# The activation request, signed with the device key when there is one: a fresh
# challenge from the broker goes into the body, and the signature covers it all.
ask_broker() {
    serial=$(broker_serial)
    fields="\"serial\":\"$(json_escape "$serial")\",\"hostname\":\"$(cat "$ROOT/etc/hostname" 2>/dev/null)\",\"machine_id\":\"$(tr -d '\n' <"$ROOT/etc/machine-id")\",\"image_sha256\":\"${PIPROV_IMAGE_SHA256:-}\",\"previous_instance_id\":\"$(cat "$PREVIOUS_ID_FILE" 2>/dev/null)\""
    EXTRA_HEADERS=
    if [ -z "$DEVICE_PUBKEY" ]; then
        broker_post /v1/activations "{$fields}"
        return
    fi
    # A refused or failed request leaves the challenge empty (the refusal is logged).
    challenge=$(broker_post /v1/challenges '{}' | json_value challenge)
    [ -n "$challenge" ] || { log "the broker gave no challenge"; return 1; }
    body="{\"challenge\":\"$challenge\",$fields}"
    sign_request "$body" || { log "rpi-fw-crypto could not sign the request"; return 1; }
    ask_rc=0
    broker_post /v1/activations "$body" || ask_rc=$?
    scrub_file "$EXTRA_HEADERS"
    EXTRA_HEADERS=
    return $ask_rc
}

# Sets ACTIVATION_ID, ACTIVATION_CODE and ACTIVATION_REGION, or returns RETRY/FAILED.
fetch_activation() {
    adopt_boot_secret
    if ! read_conf "$SECRET" "$SECRET_KEYS"; then
        write_status failed "the activation secret is refused: $CONF_ERROR; put a fresh $BOOT_SECRET on the boot partition and reboot"
        log "secret refused: $CONF_ERROR"
        return $FAILED
    fi
    ACTIVATION_REGION=${PIPROV_ACTIVATION_REGION:-${PIPROV_REGION:-}}
    if [ -n "${PIPROV_ACTIVATION_CODE:-}" ] && [ -n "${PIPROV_ACTIVATION_ID:-}" ]; then
        if ! is_uuid "$PIPROV_ACTIVATION_ID"; then
            write_status failed "the activation id in the secret is not an SSM activation id (a UUID); put a fresh $BOOT_SECRET on the boot partition and reboot"
            return $FAILED
        fi
        ACTIVATION_ID=$PIPROV_ACTIVATION_ID
        ACTIVATION_CODE=$PIPROV_ACTIVATION_CODE
        return 0
    fi
    if [ "${PIPROV_SOURCE:-}" = broker ] && [ -n "${PIPROV_BROKER_TOKEN:-}" ]; then
        BROKER_REFUSAL_FILE=$(private_tmp)
        reply_file=$(private_tmp)
        asked=0
        ask_broker >"$reply_file" || asked=$?
        reply=$(cat "$reply_file")
        scrub_file "$reply_file"
        refusal=$(cat "$BROKER_REFUSAL_FILE")
        rm -f "$BROKER_REFUSAL_FILE"
        if [ "$asked" -ne 0 ]; then
            RETRY_CAUSE=${refusal:-the broker at $PIPROV_BROKER_URL did not give an activation}
            RETRY_CAUSE="$RETRY_CAUSE${DEVICE_NOTE:+ ($DEVICE_NOTE)}"
            write_status pending "$RETRY_CAUSE"
            log "broker at $PIPROV_BROKER_URL did not give an activation"
            return $RETRY
        fi
        ACTIVATION_ID=$(printf '%s' "$reply" | json_value activation_id)
        ACTIVATION_CODE=$(printf '%s' "$reply" | json_value activation_code)
        region=$(printf '%s' "$reply" | json_value region)
        [ -n "$region" ] && ACTIVATION_REGION=$region
        if [ -z "$ACTIVATION_ID" ] || [ -z "$ACTIVATION_CODE" ]; then
            log "broker reply has no activation"
            return $RETRY
        fi
        if ! is_uuid "$ACTIVATION_ID"; then
            RETRY_CAUSE="the broker's reply holds no valid activation id"
            log "$RETRY_CAUSE"
            return $RETRY
        fi
        log "broker issued activation $ACTIVATION_ID${DEVICE_PUBKEY:+ (request signed with the device key)}"
        return 0
    fi
    write_status needs-activation "no activation on this card: its secrets were used up by the card it was cloned from; put a fresh $BOOT_SECRET on the boot partition and reboot"
    log "no activation available"
    return $FAILED
}

register_agent() {
    if [ -z "$ACTIVATION_REGION" ]; then
        write_status failed "no region configured"
        return $FAILED
    fi
    output=$(private_tmp)
    agent_rc=0
    amazon-ssm-agent -register -y -id "$ACTIVATION_ID" -code "$ACTIVATION_CODE" -region "$ACTIVATION_REGION" >"$output" 2>&1 || agent_rc=$?
    # The agent's output never holds the code; keep its last line for the journal.
    last=$(grep -v '^[[:space:]]*$' "$output" | tail -n 1 || true)
    # RegisterManagedInstance's error types name the cause; exit 1 covers all.
    answer=other
    grep -q 'InvalidActivation\|ActivationExpired\|RegistrationLimitExceeded' "$output" && answer=refused
    grep -q 'InternalServerError\|TooManyUpdates' "$output" && answer=busy
    grep -q 'InvalidPublicKey' "$output" && answer=bug
    grep -qi 'signature expired\|InvalidSignatureException\|certificate is not yet valid\|certificate has expired' "$output" && answer=clock
    scrub_file "$output"
    if [ "$agent_rc" -eq 0 ]; then
        log "agent: $last"
        failpoint registered
        return 0
    fi
    case $answer in
        refused)
            # Final for this activation: expired, used up, or not an activation.
            log "SSM refused activation $ACTIVATION_ID: $last"
            if [ "${PIPROV_SOURCE:-}" = broker ]; then
                return $RETRY
            fi
            scrub_secrets
            write_status failed "activation $ACTIVATION_ID was refused (expired, used up or wrong code): $last"
            return $FAILED ;;
        bug)
            # The agent's own key was refused: no retry can help, and the
            # activation is unspent, so it is kept for the next boot.
            write_status failed "SSM refused the agent's public key (InvalidPublicKey): a bug in the agent or piprov, please report it; $last"
            log "SSM refused the agent's public key: $last"
            return $FAILED ;;
        clock)
            RETRY_CAUSE="the clock is wrong ($(now_utc)): SSM refuses requests from a clock this far off; waiting for the time to be set (NTP)"
            write_status pending "$RETRY_CAUSE"
            log "clock off by too much for SSM: $last" ;;
        busy)
            RETRY_CAUSE="SSM is busy: $last"
            log "$RETRY_CAUSE: retrying" ;;
        *)
            RETRY_CAUSE="the agent could not register: $last"
            log "agent exited with $agent_rc: $last" ;;
    esac
    return $RETRY
}

report_to_broker() {
    [ "${PIPROV_SOURCE:-}" = broker ] && [ -n "${PIPROV_BROKER_TOKEN:-}" ] || return 0
    serial=$(broker_serial)
    body="{\"serial\":\"$(json_escape "$serial")\",\"instance_id\":\"$1\",\"previous_instance_id\":\"$(cat "$PREVIOUS_ID_FILE" 2>/dev/null)\"}"
    BROKER_REFUSAL_FILE=$(private_tmp)
    EXTRA_HEADERS=
    broker_post /v1/registrations "$body" >/dev/null || log "could not report the registration to the broker (it can tag the node later)"
    rm -f "$BROKER_REFUSAL_FILE"
}

try_register() {
    previous=$(cat "$PREVIOUS_ID_FILE" 2>/dev/null || true)
    current=$(current_instance_id)
    # A power cut after the agent registered but before we noted it: the agent's
    # files already hold a new id, and the single-use activation is spent.
    if [ -z "$current" ] || [ "$current" = "$previous" ]; then
        fetch_activation || return $?
        register_agent || return $?
        current=$(current_instance_id)
    else
        log "already registered as $current"
    fi
    if [ -z "$current" ] || [ "$current" = "$previous" ]; then
        log "the agent reported success but holds no new instance id"
        return $RETRY
    fi
    report_to_broker "$current"
    {
        echo "identity=$IDENTITY"
        echo "machine_id=$(tr -d '\n' <"$ROOT/etc/machine-id")"
        echo "instance_id=$current"
        echo "bound_at=$(now_utc)"
    } | replace_file "$BINDING" || return $RETRY
    failpoint bound
    scrub_secrets
    rm -f "$JOURNAL" "$NEEDS_REGISTRATION"
    sync
    systemctl start amazon-ssm-agent.service || log "could not start amazon-ssm-agent"
    write_status registered "registered as $current${DEVICE_NOTE:+ ($DEVICE_NOTE)}"
    log "registered as $current and bound to $IDENTITY"
}

main() {
    export PIPROV_STEP=register
    [ -f "$NEEDS_REGISTRATION" ] || { log "not marked for registration: nothing to do"; exit 0; }
    scrub_tmp
    trap scrub_tmp EXIT
    trap 'exit 1' INT TERM
    if ! read_conf "$CONF" "$CONF_KEYS"; then
        write_status failed "the card's settings are refused: $CONF_ERROR"
        log "settings refused: $CONF_ERROR"
        exit 0
    fi
    IDENTITY=$(hardware_identity) || { log "cannot tell which hardware this is"; exit 0; }
    if [ "${PIPROV_SOURCE:-}" = broker ]; then
        # The token travels to this URL: never in clear, whatever the file says.
        case ${PIPROV_BROKER_URL:-} in
            https://?*) ;;
            *)
                write_status failed "the broker URL '${PIPROV_BROKER_URL:-}' is not https://: the token is not sent"
                log "refusing broker URL '${PIPROV_BROKER_URL:-}': not https://"
                exit 0 ;;
        esac
    fi
    device_key_ready
    max=${PIPROV_MAX_ATTEMPTS:-0}
    attempt=0
    while :; do
        attempt_rc=0
        try_register || attempt_rc=$?
        [ "$attempt_rc" -eq 0 ] && exit 0
        [ "$attempt_rc" -eq "$FAILED" ] && exit 0
        attempt=$((attempt + 1))
        if [ "$max" -gt 0 ] && [ "$attempt" -ge "$max" ]; then
            write_status pending "${RETRY_CAUSE:+$RETRY_CAUSE; }gave up after $attempt attempts; will try again on the next boot"
            exit 1
        fi
        delay=$(backoff_delay "$attempt")
        log "attempt $attempt failed; retrying in ${delay}s"
        sleep "$delay"
    done
}

main "$@"
