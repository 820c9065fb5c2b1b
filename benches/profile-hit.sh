#!/usr/bin/env bash
# Profiles the hit path: the gateway (access log on, and off) and the bare hyper server under the
# same wrk load (one hot run, or RUNS=N random runs), with perf. Loopback only; every process it
# starts is stopped by it; about a minute.
#
#   benches/profile-hit.sh            # one hot run
#   RUNS=10000 benches/profile-hit.sh # 10,000 runs at random
#   MISS=1 benches/profile-hit.sh     # the miss path, beside the bare stack proxying
#   CALLGRAPH=1 benches/profile-hit.sh # with call chains (perf report -g caller -i ...)
#
# For each server it prints: requests/s, CPU µs per request, system calls per request, and the
# symbols that cost most per request (µs, from cpu-clock samples). The perf data stays in
# bench-results/profile-<date>/ for `perf report -i`.
#
# Needs perf (the hardware counters are not needed: it samples cpu-clock), wrk, taskset.

set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

SECS=${SECS:-5}   # seconds recorded per server
RUNS=${RUNS:-}    # empty: one hot run; N: N runs at random
MISS=${MISS:-}    # 1: the miss path (every run running, running_ttl = "0s"; RUNS defaults to 10000)
[ -n "$MISS" ] && RUNS=${RUNS:-10000}
TOP=${TOP:-25}
export TOKIO_WORKER_THREADS=${TOKIO_WORKER_THREADS:-1}
export DIFY_API_KEY=app-bench-profile
HZ=4999

for tool in perf wrk taskset curl timeout; do
    command -v "$tool" >/dev/null || { echo "profile-hit.sh: needs $tool" >&2; exit 2; }
done
cargo build --release --locked --quiet --bin dify-gateway \
    --example mock-dify --example bare-hyper --example loadgen
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
OUT=$ROOT/bench-results/profile-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
# The access log goes to a file on tmpfs, as in e2e.sh.
LOGDIR=$(mktemp -d "$([ -w /dev/shm ] && echo /dev/shm || echo /tmp)/dify-gateway-profile.XXXXXX")
# shellcheck source=benches/pids.sh
. "$ROOT/benches/pids.sh"
cleanup() {
    stop_pids 10
    rm -rf "$LOGDIR"
}
trap cleanup EXIT

read -r MOCK_PORT GW_PORT NOLOG_PORT BARE_PORT < <("$TARGET/examples/loadgen" ports 4 | paste -sd ' ')
CACHE="" MOCK_SECS=0
[ -n "$MISS" ] && CACHE=$'[cache]\nrunning_ttl = "0s"\n' MOCK_SECS=1000000
printf '%s[log]\naccess_log = false\n' "$CACHE" >"$OUT/nolog.toml"
printf '%s' "$CACHE" >"$OUT/gateway.toml"
# In the miss profile every run id is a run that stays running for the whole profile.
taskset -c 1 "$TARGET/examples/mock-dify" "127.0.0.1:$MOCK_PORT" "$MOCK_SECS" \
    >"$OUT/mock.log" 2>&1 &
PIDS+=($!)
taskset -c 0 "$TARGET/dify-gateway" --config "$OUT/gateway.toml" --listen "127.0.0.1:$GW_PORT" --admin-listen 127.0.0.1:0 \
    --upstream "http://127.0.0.1:$MOCK_PORT/v1" >"$LOGDIR/gateway-access.log" 2>&1 &
PIDS+=($!)
GW_PID=$!
taskset -c 0 "$TARGET/dify-gateway" --config "$OUT/nolog.toml" --listen "127.0.0.1:$NOLOG_PORT" \
    --admin-listen 127.0.0.1:0 --upstream "http://127.0.0.1:$MOCK_PORT/v1" >/dev/null 2>&1 &
PIDS+=($!)
NOLOG_PID=$!
# The bare stack: for the hit path a hyper server answering from memory, for the miss path the
# same proxying to the mock through hyper-util's client (`bare-hyper ... proxy=URL`).
BARE_ARGS=()
[ -n "$MISS" ] && BARE_ARGS=(1024 "proxy=http://127.0.0.1:$MOCK_PORT")
taskset -c 0 "$TARGET/examples/bare-hyper" "127.0.0.1:$BARE_PORT" "${BARE_ARGS[@]}" >/dev/null 2>&1 &
PIDS+=($!)
BARE_PID=$!
for p in $GW_PORT $NOLOG_PORT $BARE_PORT; do
    for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$p/" && break; sleep 0.1; done
done

HOT=/v1/workflows/run/$(printf '%08x-0000-4000-8000-%012x' 2 1)
if [ -n "$MISS" ]; then
    export WRK_RUNS=$RUNS WRK_PREFIX=2
elif [ -n "$RUNS" ]; then
    for p in $GW_PORT $NOLOG_PORT; do
        timeout 120 taskset -c 1 "$TARGET/examples/loadgen" warm --addr "127.0.0.1:$p" \
            --prefix 2 --count "$RUNS" --conc 32 >/dev/null
    done
    export WRK_RUNS=$RUNS WRK_PREFIX=2
else
    for p in $GW_PORT $NOLOG_PORT; do curl -s -o /dev/null "http://127.0.0.1:$p$HOT"; done
fi

for s in "gateway:$GW_PID:$GW_PORT" "gateway-nolog:$NOLOG_PID:$NOLOG_PORT" "bare:$BARE_PID:$BARE_PORT"; do
    IFS=: read -r name pid port <<<"$s"
    timeout $((SECS + 30)) taskset -c 1 wrk -t1 -c50 -d$((SECS + 2))s \
        -s "$ROOT/benches/wrk.lua" "http://127.0.0.1:$port$HOT" >"$OUT/$name.wrk" &
    wrk_pid=$!
    sleep 1
    perf stat -e raw_syscalls:sys_enter,context-switches -p "$pid" -o "$OUT/$name.stat" \
        -- sleep 1 >/dev/null 2>&1 || true
    perf record -e cpu-clock -F $HZ ${CALLGRAPH:+--call-graph dwarf,8192} -p "$pid" \
        -o "$OUT/$name.data" -- sleep "$SECS" \
        >/dev/null 2>&1
    wait "$wrk_pid"
    line=$(grep '^WRK ' "$OUT/$name.wrk")
    read -r requests secs _ <<<"$(sed -e 's/^WRK //' -e 's/[a-z0-9]*=//g' <<<"$line")"
    rate=$(awk -v r="$requests" -v s="$secs" 'BEGIN {printf "%.0f", r / s}')
    syscalls=$(awk '/raw_syscalls:sys_enter/ {gsub(",", "", $1); print $1}' "$OUT/$name.stat")
    perf report -i "$OUT/$name.data" -n --no-children --sort dso,sym --stdio -g none \
        2>/dev/null | grep -v '^#' | grep -v '^$' >"$OUT/$name.symbols"
    samples=$(awk '{n += $2} END {print n + 0}' "$OUT/$name.symbols")
    echo "== $name: $rate req/s, $(awk -v n="${samples:-0}" -v r="$rate" -v hz=$HZ -v t="$SECS" \
        'BEGIN {printf "%.2f", n / hz / (r * t) * 1e6}') CPU µs/req (samples), $(awk \
        -v n="${syscalls:-0}" -v r="$rate" 'BEGIN {printf "%.2f", n / r}') syscalls/req"
    # Self time per request of the costliest symbols.
    head -"$TOP" "$OUT/$name.symbols" \
        | awk -v r="$rate" -v hz=$HZ -v t="$SECS" \
            '{us = $2 / hz / (r * t) * 1e6; $1 = ""; $2 = ""; printf "  %6.3f µs  %s\n", us, $0}' \
        | cut -c1-150
done
echo "perf data in ${OUT#"$ROOT"/}"
