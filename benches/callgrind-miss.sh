#!/usr/bin/env bash
# Counts the instructions the gateway executes per miss, under callgrind: deterministic where
# the shared machine's timings are not (user space only; the kernel's share is not counted).
# A mock that keeps every run running, the gateway with running_ttl = "0s" under valgrind,
# N requests for distinct run ids over CONNS connections; counters are zeroed after a warm-up
# and dumped after the measured requests. Loopback only; every process it starts is stopped.
#
#   benches/callgrind-miss.sh                      # the current release build
#   GATEWAY=/path/to/older/dify-gateway benches/callgrind-miss.sh
#   HIT=1 benches/callgrind-miss.sh                # the hit path instead: one hot terminal run,
#                                                  # access log off, wrk for 5 s (needs wrk)
#
# Prints instructions per request and the costliest functions (inclusive and self), and keeps
# the callgrind output in bench-results/callgrind-<date>/.

set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
N=${N:-2000}        # measured requests
CONNS=${CONNS:-10}  # loadgen connections
HIT=${HIT:-}        # 1: hits on one hot run instead of misses
TOP=${TOP:-30}
export DIFY_API_KEY=app-bench-callgrind TOKIO_WORKER_THREADS=1

for tool in valgrind callgrind_control callgrind_annotate curl timeout; do
    command -v "$tool" >/dev/null || { echo "callgrind-miss.sh: needs $tool" >&2; exit 2; }
done
cargo build --release --locked --quiet --bin dify-gateway --example mock-dify --example loadgen
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
GATEWAY=${GATEWAY:-$TARGET/dify-gateway}
OUT=$ROOT/bench-results/callgrind-$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
# shellcheck source=benches/pids.sh
. "$ROOT/benches/pids.sh"
cleanup() {
    stop_pids 20
}
trap cleanup EXIT

read -r MOCK_PORT GW_PORT < <("$TARGET/examples/loadgen" ports 2 | paste -sd ' ')
if [ -n "$HIT" ]; then
    command -v wrk >/dev/null || { echo "callgrind-miss.sh: HIT=1 needs wrk" >&2; exit 2; }
    printf '[log]\naccess_log = false\n' >"$OUT/gateway.toml"
    MOCK_SECS=0 # every run has ended: its answer is terminal, cached for good
else
    printf '[cache]\nrunning_ttl = "0s"\n' >"$OUT/gateway.toml"
    MOCK_SECS=1000000
fi
"$TARGET/examples/mock-dify" "127.0.0.1:$MOCK_PORT" "$MOCK_SECS" >"$OUT/mock.log" 2>&1 &
PIDS+=($!)
valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
    "$GATEWAY" --config "$OUT/gateway.toml" --listen "127.0.0.1:$GW_PORT" \
    --admin-listen 127.0.0.1:0 --upstream "http://127.0.0.1:$MOCK_PORT/v1" \
    >"$OUT/gateway.log" 2>"$OUT/valgrind.log" &
GW_PID=$!
PIDS+=($GW_PID)
for _ in $(seq 300); do
    curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$GW_PORT/healthz" && break
    sleep 0.2
done
load() {
    timeout 600 "$TARGET/examples/loadgen" warm --addr "127.0.0.1:$GW_PORT" --prefix "$1" \
        --count "$2" --conc "$CONNS"
}
if [ -n "$HIT" ]; then
    HOT="http://127.0.0.1:$GW_PORT/v1/workflows/run/$(printf '%08x-0000-4000-8000-%012x' 2 1)"
    curl -s -o /dev/null "$HOT"
    timeout 60 wrk -t1 -c"$CONNS" -d3s "$HOT" >/dev/null # warm-up
    callgrind_control -z "$GW_PID" >/dev/null 2>&1
    timeout 60 wrk -t1 -c"$CONNS" -d5s "$HOT" >"$OUT/load.txt"
    N=$(awk '/requests in/ {print $1}' "$OUT/load.txt")
    WHAT=hits
else
    load 8 500 >/dev/null # warm-up: pools, buffers, the allocator
    callgrind_control -z "$GW_PID" >/dev/null 2>&1
    load 9 "$N" >"$OUT/load.txt"
    WHAT=misses
fi
callgrind_control -d "$GW_PID" >/dev/null 2>&1
sleep 1
dump=$(ls -t "$OUT"/callgrind.out.* | head -1)
total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
echo "== $(basename "$GATEWAY"): $N $WHAT, $(awk -v t="$total" -v n="$N" 'BEGIN {printf "%.0f", t / n}') instructions per request (user space)"
echo "-- inclusive"
callgrind_annotate --inclusive=yes --threshold=100 "$dump" 2>/dev/null | grep -E '^ *[0-9,]+ ' | head -"$TOP" \
    | awk -v n="$N" '{c = $1; gsub(",", "", c); $1 = ""; printf "%9.0f  %s\n", c / n, $0}' | cut -c1-170
echo "-- self"
callgrind_annotate --inclusive=no --threshold=100 "$dump" 2>/dev/null | grep -E '^ *[0-9,]+ ' | head -"$TOP" \
    | awk -v n="$N" '{c = $1; gsub(",", "", c); $1 = ""; printf "%9.0f  %s\n", c / n, $0}' | cut -c1-170
echo "callgrind output in ${OUT#"$ROOT"/}"
