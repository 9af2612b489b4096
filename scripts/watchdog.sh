#!/bin/sh
# Runs a command (a test run); any test binary (target/*/deps/*) that runs for
# over LIMIT seconds has every thread's backtrace printed (gdb) and is killed.
# A hung test then fails its run at once, saying where it hung, instead of
# holding CI until CI's own time limit ends it with nothing to say.
#   watchdog.sh LIMIT_SECONDS COMMAND [ARG...]
set -u
limit=$1
shift
"$@" &
run=$!
while kill -0 "$run" 2>/dev/null; do
    sleep 5
    ps -eo pid=,etimes=,args= | while read -r pid seconds exe args; do
        case $exe in */target/*/deps/*) ;; *) continue ;; esac
        [ "$seconds" -gt "$limit" ] || continue
        echo "watchdog: $exe $args has run for $seconds s (limit $limit); its threads:" >&2
        gdb -p "$pid" -batch -ex 'thread apply all bt' 2>&1 | grep -v '^\[New LWP' >&2 || true
        kill -KILL "$pid"
    done
done
wait "$run"
