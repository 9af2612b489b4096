#!/bin/sh
# A private PostgreSQL server for the tests, on loopback, from Debian's packages:
#   postgres.sh start DIR PORT   (initdb on first use; trust on 127.0.0.1 only)
#   postgres.sh stop DIR | restart DIR
# Run as root it runs the server as the postgres user (PostgreSQL refuses root).
set -eu
action=$1
dir=$2
bin=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1)
[ -n "$bin" ] || { echo "PostgreSQL's server is not installed (apt-get install postgresql)" >&2; exit 1; }

as_owner() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case $action in
start)
    port=$3
    if [ ! -f "$dir/PG_VERSION" ]; then
        mkdir -p "$dir"
        [ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
        as_owner "$bin/initdb" -D "$dir" -U piprov --auth=trust -N >/dev/null
        # Members of piprov_pw must give their password (the broker's password
        # tests); the rest are trusted on loopback.
        { echo "host all +piprov_pw 127.0.0.1/32 scram-sha-256"; cat "$dir/pg_hba.conf"; } >"$dir/pg_hba.new"
        mv "$dir/pg_hba.new" "$dir/pg_hba.conf"
        [ "$(id -u)" -eq 0 ] && chown postgres: "$dir/pg_hba.conf"
        # TLS for the broker's sslmode=require tests: a CA of the tests' own
        # (ca.pem) and a certificate it signs for 127.0.0.1.
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
            -subj /CN=piprov-test-postgres-ca -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
        printf 'basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n' >"$dir/server.ext"
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
            -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
        openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
            -CAcreateserial -days 3650 -extfile "$dir/server.ext" -out "$dir/server.crt" 2>/dev/null
        chmod 600 "$dir/server.key"
        [ "$(id -u)" -eq 0 ] && chown postgres: "$dir/server.key" "$dir/server.crt"
        # Many brokers' pools at once (the load test): more than the default 100.
        cat >>"$dir/postgresql.conf" <<CONF
ssl = on
ssl_cert_file = '$dir/server.crt'
ssl_key_file = '$dir/server.key'
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
max_connections = 300
CONF
    fi
    as_owner "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 start >/dev/null
    ;;
stop)
    as_owner "$bin/pg_ctl" -D "$dir" -m fast -w stop >/dev/null
    ;;
restart)
    as_owner "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -m fast -w -t 60 restart >/dev/null
    ;;
*)
    echo "usage: postgres.sh start DIR PORT | stop DIR | restart DIR" >&2
    exit 2
    ;;
esac
