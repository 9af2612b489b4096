# Sourced by the demos and the station bench: an SSM-compatible endpoint on
# loopback (tests/support/ssm_stub.py, the one the tests use), and the
# environment in which piprov talks to it with the real AWS SDK, made-up keys
# and nothing of this machine's own AWS setup.
#
#   . scripts/local-ssm.sh; local_ssm DIR   sets ssm_pid and endpoint; the
#                                           cache goes to DIR/cache
#   bench_recipe FILE                       a recipe whose cards each get
#                                           their own activation from it
local_ssm() {
    python3 tests/support/ssm_stub.py "$1/ssm.port" "$1/ssm.log" 0 3600 &
    # shellcheck disable=SC2034 # read by the scripts that source this
    ssm_pid=$!
    for _ in $(seq 1 100); do [ -s "$1/ssm.port" ] && break; sleep 0.1; done
    endpoint=http://127.0.0.1:$(cat "$1/ssm.port")
    export AWS_ENDPOINT_URL="$endpoint" AWS_REGION=eu-west-1 AWS_EC2_METADATA_DISABLED=true \
        AWS_ACCESS_KEY_ID=AKIAEXAMPLEEXAMPLE00 AWS_SECRET_ACCESS_KEY=secretsecretsecretsecretsecretsecret0000 \
        AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null PIPROV_CACHE_DIR="$1/cache"
}

bench_recipe() {
    cat >"$1" <<'RECIPE'
name = "bench"
region = "eu-west-1"
iam_role = "SSMServiceRole"

[activation]
source = "embedded"
expires = "2h"
RECIPE
}
