#!/bin/sh
# Runs a command with a private PostgreSQL server up (scripts/postgres.sh), and
# stops the server after, whatever the command's outcome. The tests find it by
# PIPROV_TEST_POSTGRES (a superuser's URL), PIPROV_TEST_POSTGRES_DATA and
# PIPROV_TEST_POSTGRES_CA.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dir=${PIPROV_TEST_POSTGRES_DATA:-${TMPDIR:-/tmp}/piprov-postgres}
port=${PIPROV_TEST_POSTGRES_PORT:-55432}
sh "$here/postgres.sh" start "$dir" "$port"
trap 'sh "$here/postgres.sh" stop "$dir" || true' EXIT INT TERM
export PIPROV_TEST_POSTGRES="postgres://piprov@127.0.0.1:$port/postgres"
export PIPROV_TEST_POSTGRES_DATA="$dir"
# The CA the server's TLS certificate chains to (sslmode=require tests).
export PIPROV_TEST_POSTGRES_CA="$dir/ca.pem"
"$@"
