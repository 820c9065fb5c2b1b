#!/usr/bin/env bash
# End-to-end load benchmarks of dify-gateway against nginx proxy_cache and a bare hyper server,
# on loopback only. Every server and load generator this script starts is stopped by it, every
# load has a fixed duration or request count, and every step has a timeout.
#
#   benches/e2e.sh                      # whole suite, about 7 minutes on 2 cores
#   DURATION=5 RUNS=1 benches/e2e.sh    # quick look
#
# Placement: each server under test on CPU 0 (taskset), load generators and the mock Dify on
# CPU 1. TOKIO_WORKER_THREADS=1 for every tokio server (the gateway, bare hyper, the mock);
# tokio would pick 1 under `taskset -c 0` anyway, since it counts the CPUs it may run on.
# nginx runs one worker pinned to CPU 0.
#
# Scenarios (wrk ones alternate the servers, RUNS times, and report medians):
#   1 one hot terminal run, all hits          wrk -t1 -c50        gateway, gateway-nolog, nginx, bare,
#                                                                 bare-gateway-like
#   2 10,000 terminal runs at random          wrk -t1 -c50 + Lua  gateway, nginx, bare,
#                                                                 bare-distinct-bodies (10,000 copies)
#   3 cold stampede: 1,000 clients, one fresh run, upstream 200 ms slow   loadgen stampede
#   4 1,000 pollers over 100 running runs                                 loadgen poll
#   5 miss path: one connection, one running run, running_ttl = "0s"      wrk -t1 -c1
#     gateway vs nginx (cache bypassed) vs the mock directly, and the gateway on CPU 1 too
#   6 miss path under load: running_ttl = "0s", 10,000 running runs at random   wrk -t1 -c50 + Lua
#     gateway vs nginx proxy_pass (no cache) vs bare-proxy (hyper server + hyper-util client, nothing
#     else) vs bare-inline (the same with each client connection driving its own upstream
#     connection on its own task: no pool, no task between them) vs the mock directly; with
#     redis-server installed
#     also gateway-shared (the same with the shared tier on)
#   memory: 100,000 terminal runs of ~2 KB cached, RSS before and after
#
# BASELINE=path/to/an/older/dify-gateway adds that binary to scenarios 1, 5 and 6 as
# `gateway-baseline`, run alternately with the current build, to compare two versions side by
# side in one run (e.g. before and after a change: build the older commit, copy its binary).
#
# Writes bench-results/e2e-<date>.md (and the raw .tsv beside it) and prints the report.

set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DURATION=${DURATION:-10}          # seconds per wrk run
RUNS=${RUNS:-3}                   # alternating runs per wrk scenario
CONNS=${CONNS:-50}                # wrk connections in scenarios 1 and 2
RANDOM_RUNS=${RANDOM_RUNS:-10000} # runs in scenario 2
STAMPEDE_CLIENTS=${STAMPEDE_CLIENTS:-1000}
STAMPEDE_DELAY_MS=${STAMPEDE_DELAY_MS:-200}
STAMPEDE_REPEATS=${STAMPEDE_REPEATS:-3}
POLLERS=${POLLERS:-1000}
POLL_RUNS=${POLL_RUNS:-100}
POLL_SECS=${POLL_SECS:-20}        # shortened from 30 s to keep the suite short
POLL_RUNNING_SECS=${POLL_RUNNING_SECS:-10}
POLL_INTERVAL_MS=${POLL_INTERVAL_MS:-100}
MEMORY_RUNS=${MEMORY_RUNS:-100000}
MEMORY_OUTPUT_BYTES=${MEMORY_OUTPUT_BYTES:-1600} # gives ~2 KB bodies
OUTPUT_BYTES=${OUTPUT_BYTES:-1024}               # the mock's default: ~1.5 KB bodies
ONLY=${ONLY:-"1 2 3 4 5 6 memory"}               # which scenarios to run
QUIET_WAIT=${QUIET_WAIT:-120}                    # max seconds to wait for an idle machine
SERVER_CPU=0
LOAD_CPU=1
export TOKIO_WORKER_THREADS=${TOKIO_WORKER_THREADS:-1}
KEY=app-bench-3b1e9c0d7a
export DIFY_API_KEY=$KEY # the gateway and the mock read it
CLK_TCK=$(getconf CLK_TCK)

for tool in wrk nginx taskset curl timeout; do
    command -v "$tool" >/dev/null || { echo "e2e.sh: needs $tool (apt-get install -y wrk nginx)" >&2; exit 2; }
done

echo "building release binaries..." >&2
cargo build --release --locked --quiet --bin dify-gateway \
    --example mock-dify --example bare-hyper --example loadgen --example body-retention
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
GATEWAY=$TARGET/dify-gateway
MOCK=$TARGET/examples/mock-dify
BARE=$TARGET/examples/bare-hyper
LOADGEN=$TARGET/examples/loadgen

BASE_TMP=/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && BASE_TMP=/dev/shm
WORK=$(mktemp -d "$BASE_TMP/dify-gateway-bench.XXXXXX")
RESULTS=$WORK/results.tsv
: >"$RESULTS"
declare -A PIDS=()

log() { echo "[$(date +%T)] $*" >&2; }

# --- process control -----------------------------------------------------------------------

# start NAME CPU CMD... : runs CMD pinned to CPU in the background, output in $WORK/NAME.log.
start() {
    local name=$1 cpu=$2
    shift 2
    taskset -c "$cpu" "$@" >"$WORK/$name.log" 2>&1 &
    PIDS[$name]=$!
}

# stop NAME : SIGINT, up to 10 s to exit, then SIGKILL.
stop() {
    local name=$1 pid=${PIDS[$1]:-}
    [ -n "$pid" ] || return 0
    kill -INT "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "  $name did not exit on SIGINT within 10 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    unset "PIDS[$name]"
}

cleanup() {
    for name in "${!PIDS[@]}"; do stop "$name"; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_http URL : until URL answers at all (any status), at most 10 s.
wait_http() {
    for _ in $(seq 100); do
        curl -s -o /dev/null --max-time 1 "$1" && return 0
        sleep 0.1
    done
    echo "e2e.sh: $1 did not come up" >&2
    return 1
}

free_ports() { "$LOADGEN" ports "$1" | paste -sd ' '; }

# --- /proc readings ------------------------------------------------------------------------

# pids_of NAME : the process and its children (nginx's workers).
pids_of() {
    local pid=${PIDS[$1]}
    echo "$pid $(pgrep -P "$pid" | tr '\n' ' ')"
}

# cpu_ticks NAME : utime+stime of the process and its children, all threads, in clock ticks.
cpu_ticks() {
    local total=0 p
    for p in $(pids_of "$1"); do
        # Fields after the ")" that closes the command name: utime is the 12th, stime the 13th.
        total=$((total + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
    done
    echo "$total"
}

# status_kb NAME FIELD : a /proc/PID/status field (VmRSS, VmHWM) in kB, summed over the
# process and its children.
status_kb() {
    local total=0 p
    for p in $(pids_of "$1"); do
        total=$((total + $(awk -v f="$2:" '$1 == f {print $2}' "/proc/$p/status")))
    done
    echo "$total"
}

# busy_ticks : ticks all CPUs spent not idle since boot.
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat; }

# children_ticks VAR : sets VAR to the CPU time of this shell's finished children (wrk,
# loadgen), in ticks. `times` must run in this shell, not in a $(...) subshell.
children_ticks() {
    times >"$WORK/times"
    printf -v "$1" '%s' "$(tail -1 "$WORK/times" | awk -v hz="$CLK_TCK" '{
        t = 0
        for (i = 1; i <= 2; i++) { split($i, a, "m"); t += a[1] * 60 + a[2] + 0 }
        printf "%d\n", t * hz + 0.5 }')"
}

# wait_quiet : the machine is shared; wait (at most QUIET_WAIT s) until both CPUs have been
# at least 90% idle for a second, so other work does not skew a run.
wait_quiet() {
    local b0 b1 waited=0
    while [ "$waited" -lt "$QUIET_WAIT" ]; do
        b0=$(busy_ticks)
        sleep 1
        b1=$(busy_ticks)
        [ $((b1 - b0)) -le $((2 * CLK_TCK / 10)) ] && return 0
        waited=$((waited + 1))
    done
    log "  machine still busy after ${QUIET_WAIT}s; measuring anyway"
}

# upstream_count : requests the current mock has served.
upstream_count() { curl -s --max-time 2 "http://127.0.0.1:$STATS_PORT/"; }

record() { printf '%s\n' "$(IFS=$'\t'; echo "$*")" >>"$RESULTS"; }
kv() { record kv "$1" "$2" "$3"; }

# --- servers -------------------------------------------------------------------------------

# start_mock SECS [mock options...] : the mock Dify on CPU 1, its counter on STATS_PORT.
start_mock() {
    local secs=$1
    shift
    read -r MOCK_PORT STATS_PORT < <(free_ports 2)
    start mock "$LOAD_CPU" "$MOCK" "127.0.0.1:$MOCK_PORT" "$secs" \
        --stats "127.0.0.1:$STATS_PORT" "$@"
    wait_http "http://127.0.0.1:$STATS_PORT/"
}

# start_gateway NAME PORT [CONFIG [BINARY]] : the release binary (or BINARY) on CPU 0, stdout
# (the access log) to a file.
start_gateway() {
    local name=$1 port=$2 cfg=${3:-} bin=${4:-$GATEWAY}
    local args=(--listen "127.0.0.1:$port" --admin-listen 127.0.0.1:0 --upstream "http://127.0.0.1:$MOCK_PORT/v1")
    [ -n "$cfg" ] && args+=(--config "$cfg")
    start "$name" "$SERVER_CPU" "$bin" "${args[@]}"
    wait_http "http://127.0.0.1:$port/healthz"
}

# start_nginx PORT MISS_PORT : nginx from the template, with a fresh prefix and cache.
start_nginx() {
    local prefix=$WORK/nginx
    rm -rf "$prefix"
    mkdir -p "$prefix/cache"
    sed -e "s|@PREFIX@|$prefix|g" -e "s|@CACHE_DIR@|$prefix/cache|g" \
        -e "s|@UPSTREAM_PORT@|$MOCK_PORT|g" -e "s|@PORT@|$1|g" -e "s|@MISS_PORT@|$2|g" \
        -e "s|@KEY@|$KEY|g" -e "s|@USER@|$(id -un)|g" -e "s|@GROUP@|$(id -gn)|g" \
        "$ROOT/benches/nginx.conf.template" >"$prefix/nginx.conf"
    start nginx "$SERVER_CPU" nginx -p "$prefix" -c "$prefix/nginx.conf" -e "$prefix/error.log"
    wait_http "http://127.0.0.1:$2/"
}

write_config() { printf '%s\n' "$2" >"$WORK/$1.toml"; echo "$WORK/$1.toml"; }
NOLOG_CFG=$(write_config nolog $'[log]\naccess_log = false')
MISS_CFG=$(write_config miss $'[cache]\nrunning_ttl = "0s"')

# --- wrk -----------------------------------------------------------------------------------

# run_wrk SCENARIO SERVER RUN CONNS URL [VAR=VALUE...] : one wrk run on CPU 1 against the
# server NAME; records requests, latency percentiles, the server's CPU ticks and the upstream
# requests made meanwhile.
run_wrk() {
    local scenario=$1 server=$2 run=$3 conns=$4 url=$5
    shift 5
    local up0 up1 t0 t1 b0 b1 c0 c1 out line requests secs p50 p99 p999 errors foreign
    wait_quiet
    up0=$(upstream_count)
    children_ticks c0
    b0=$(busy_ticks)
    t0=$(cpu_ticks "$server")
    out=$(env "$@" timeout $((DURATION + 30)) taskset -c "$LOAD_CPU" \
        wrk -t1 -c"$conns" -d"${DURATION}s" --latency -s "$ROOT/benches/wrk.lua" "$url")
    t1=$(cpu_ticks "$server")
    b1=$(busy_ticks)
    children_ticks c1
    up1=$(upstream_count)
    # CPU used by anything but this server and wrk (other work on the machine, the kernel's
    # own threads), as a percentage of both CPUs over the run.
    foreign=$(( ((b1 - b0) - (t1 - t0) - (c1 - c0)) * 100 / (2 * CLK_TCK * DURATION) ))
    line=$(grep '^WRK ' <<<"$out") || { echo "$out" >&2; return 1; }
    read -r requests secs p50 p99 p999 errors <<<"$(sed -e 's/^WRK //' -e 's/[a-z0-9]*=//g' <<<"$line")"
    record wrk "$scenario" "$server" "$run" "$requests" "$secs" "$p50" "$p99" "$p999" \
        $((t1 - t0)) "$errors" $((up1 - up0)) "$foreign"
    log "  $scenario $server run $run: $((requests / ${secs%.*})) req/s p99=${p99}us, other CPU ${foreign}%"
}

run_path() { echo "/v1/workflows/run/$(printf '%08x-0000-4000-8000-%012x' "$1" "$2")"; }

loadgen() { timeout 300 taskset -c "$LOAD_CPU" "$LOADGEN" "$@"; }

# kv_from SECTION : records every key=value line of stdin under SECTION.
kv_from() {
    local k v
    while IFS='=' read -r k v; do
        [ -n "$k" ] && kv "$1" "$k" "$v"
    done
}

# --- meta ----------------------------------------------------------------------------------

record meta date "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
record meta commit "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml || echo ' (src modified)')"
record meta machine "$(nproc) CPUs, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), kernel $(uname -r)"
record meta placement "servers on CPU $SERVER_CPU, load generators and mock on CPU $LOAD_CPU; TOKIO_WORKER_THREADS=$TOKIO_WORKER_THREADS; nginx 1 worker"
record meta tools "$(nginx -v 2>&1 | sed 's/.*: //'), $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}')"
record meta wrk "$DURATION s per run, $RUNS alternating runs, medians; -t1 -c$CONNS (scenario 5: -c1)"
record meta access_log "gateway: on (default), text, to a file; gateway-nolog: off; nginx: on, buffered 64k to a file"
record meta clk_tck "$CLK_TCK"

# --- scenario 1 and 2: hit path --------------------------------------------------------------

hit_scenario() {
    local scenario=$1 servers=$2
    shift 2
    local gw_port nolog_port ng_port ng_miss_port bare_port like_port distinct_port base_port
    read -r gw_port nolog_port ng_port ng_miss_port bare_port like_port distinct_port base_port \
        < <(free_ports 8)
    start_mock 0 --output-bytes "$OUTPUT_BYTES"
    start_gateway gateway "$gw_port"
    [[ $servers == *gateway-baseline* ]] && start_gateway gateway-baseline "$base_port" "" "$BASELINE"
    [[ $servers == *gateway-nolog* ]] && start_gateway gateway-nolog "$nolog_port" "$NOLOG_CFG"
    start_nginx "$ng_port" "$ng_miss_port"
    start bare "$SERVER_CPU" "$BARE" "127.0.0.1:$bare_port" "$OUTPUT_BYTES"
    wait_http "http://127.0.0.1:$bare_port/"
    if [[ $servers == *bare-gateway-like* ]]; then
        start bare-gateway-like "$SERVER_CPU" "$BARE" "127.0.0.1:$like_port" "$OUTPUT_BYTES" \
            gateway-like
        wait_http "http://127.0.0.1:$like_port/"
    fi
    if [[ $servers == *bare-distinct-bodies* ]]; then
        start bare-distinct-bodies "$SERVER_CPU" "$BARE" "127.0.0.1:$distinct_port" \
            "$OUTPUT_BYTES" plain "$RANDOM_RUNS"
        wait_http "http://127.0.0.1:$distinct_port/"
    fi
    declare -A port=([gateway]=$gw_port [gateway-nolog]=$nolog_port [nginx]=$ng_port
        [gateway-baseline]=$base_port [bare]=$bare_port [bare-gateway-like]=$like_port [bare-distinct-bodies]=$distinct_port)
    "$@" # warm-up hook, sees ${port[...]}
    local run s
    for run in $(seq "$RUNS"); do
        for s in $servers; do
            # shellcheck disable=SC2086 # WRK_ENV is a list of VAR=VALUE words
            run_wrk "$scenario" "$s" "$run" "$CONNS" "http://127.0.0.1:${port[$s]}$URL_PATH" $WRK_ENV
        done
    done
    for s in $servers; do
        record hwm "$scenario" "$s" "$(status_kb "$s" VmHWM)"
        stop "$s"
    done
    stop mock
}

warm_hot() {
    local s
    for s in gateway gateway-nolog gateway-baseline nginx; do
        # Only the servers started (gateway-baseline only with BASELINE).
        [ -n "${PIDS[$s]:-}" ] || continue
        curl -s -o /dev/null "http://127.0.0.1:${port[$s]}$URL_PATH"
        curl -s -o /dev/null "http://127.0.0.1:${port[$s]}$URL_PATH"
    done
}

warm_random() {
    local s
    for s in gateway nginx; do
        loadgen warm --addr "127.0.0.1:${port[$s]}" --prefix 2 --count "$RANDOM_RUNS" --conc 32 \
            | kv_from "2-warm: $s"
    done
}

scenario_1() {
    log "scenario 1: one hot terminal run"
    URL_PATH=$(run_path 1 1) WRK_ENV="" \
        hit_scenario "1-hot-run" "gateway ${BASELINE:+gateway-baseline }gateway-nolog nginx bare bare-gateway-like" warm_hot
}

scenario_2() {
    log "scenario 2: $RANDOM_RUNS terminal runs at random"
    URL_PATH=$(run_path 2 0) WRK_ENV="WRK_RUNS=$RANDOM_RUNS WRK_PREFIX=2" \
        hit_scenario "2-random-$RANDOM_RUNS-runs" "gateway nginx bare bare-distinct-bodies" warm_random
}

# --- scenario 3: cold stampede ---------------------------------------------------------------

# access_log_spread ID : from the gateway's access log, the leader's upstream time and the
# spread of the log lines of every request for ID (each is written right after that request's
# response is built, just before hyper writes it).
access_log_spread() {
    grep "$1" "$WORK/gateway.log" | awk '
        { split($1, t, "T"); split(t[2], hms, ":"); s = hms[1] * 3600 + hms[2] * 60 + hms[3] + 0
          if (n == 0 || s < lo) lo = s; if (n == 0 || s > hi) hi = s; n++ }
        /upstream_ms=/ { match($0, /upstream_ms=[0-9.]+/); up = substr($0, RSTART + 12, RLENGTH - 12) }
        END { printf "leader_upstream_ms_from_access_log=%.2f\n", up
              printf "access_log_lines=%d\n", n
              printf "server_side_answer_spread_ms=%.2f\n", (hi - lo) * 1000 }'
}

scenario_3() {
    log "scenario 3: stampede of $STAMPEDE_CLIENTS clients, upstream ${STAMPEDE_DELAY_MS} ms"
    local gw_port ng_port ng_miss_port held_port rep s p id section up0 t0
    read -r gw_port ng_port ng_miss_port held_port < <(free_ports 4)
    start_mock 0 --output-bytes "$OUTPUT_BYTES" --delay-ms "$STAMPEDE_DELAY_MS"
    start_gateway gateway "$gw_port"
    start_nginx "$ng_port" "$ng_miss_port"
    # The ceiling: bare hyper holding every request for a path until one timer, started by the
    # first, releases them all at once — the waiters' wake-up and writes, and nothing else.
    start bare-held "$SERVER_CPU" "$BARE" "127.0.0.1:$held_port" "$OUTPUT_BYTES" gateway-like 1 \
        "$STAMPEDE_DELAY_MS"
    wait_http "http://127.0.0.1:$held_port/"
    for rep in $(seq "$STAMPEDE_REPEATS"); do
        for s in gateway nginx bare-held; do
            # A fresh run for every stampede.
            case $s in
            gateway)
                p=$gw_port id=$(run_path 3 $((rep * 3))) section="3-stampede: gateway, run $rep" ;;
            nginx)
                p=$ng_port id=$(run_path 3 $((rep * 3 + 1)))
                section="3-stampede: nginx (proxy_cache_lock), run $rep" ;;
            *)
                p=$held_port id=$(run_path 3 $((rep * 3 + 2)))
                section="3-stampede: bare hyper, all released at once (ceiling), run $rep" ;;
            esac
            id=${id##*/}
            wait_quiet
            up0=$(upstream_count)
            t0=$(cpu_ticks "$s")
            loadgen stampede --addr "127.0.0.1:$p" --id "$id" --clients "$STAMPEDE_CLIENTS" \
                --delay-ms "$STAMPEDE_DELAY_MS" | kv_from "$section"
            kv "$section" upstream_requests $(($(upstream_count) - up0))
            kv "$section" server_cpu_ms $((($(cpu_ticks "$s") - t0) * 1000 / CLK_TCK))
            if [ "$s" = gateway ]; then
                sleep 1.2 # the access log is written by a background thread
                access_log_spread "$id" | kv_from "$section"
            fi
        done
    done
    kv "3-stampede: peak RSS" gateway_kb "$(status_kb gateway VmHWM)"
    kv "3-stampede: peak RSS" nginx_kb "$(status_kb nginx VmHWM)"
    stop gateway
    stop nginx
    stop bare-held
    stop mock
}

# --- scenario 4: pollers over running runs ---------------------------------------------------

scenario_4() {
    log "scenario 4: $POLLERS pollers over $POLL_RUNS running runs for ${POLL_SECS}s"
    local gw_port section up0 t0
    read -r gw_port < <(free_ports 1)
    start_mock "$POLL_RUNNING_SECS" --output-bytes "$OUTPUT_BYTES"
    start_gateway gateway "$gw_port"
    section="4-pollers: gateway, running_ttl 1s, poll every ${POLL_INTERVAL_MS} ms"
    wait_quiet
    up0=$(upstream_count)
    t0=$(cpu_ticks gateway)
    loadgen poll --addr "127.0.0.1:$gw_port" --prefix 4 --runs "$POLL_RUNS" \
        --pollers "$POLLERS" --interval-ms "$POLL_INTERVAL_MS" --duration-s "$POLL_SECS" \
        --running-s "$POLL_RUNNING_SECS" --ttl-ms 1000 | kv_from "$section"
    kv "$section" upstream_requests_total_from_mock $(($(upstream_count) - up0))
    kv "$section" gateway_cpu_ms $((($(cpu_ticks gateway) - t0) * 1000 / CLK_TCK))
    kv "$section" gateway_peak_rss_kb "$(status_kb gateway VmHWM)"
    stop gateway
    stop mock
}

# --- scenario 5: miss path -------------------------------------------------------------------

scenario_5() {
    log "scenario 5: miss path, one connection, one running run"
    local gw_port ng_port ng_miss_port same_port base_port miss_path run s servers
    read -r gw_port ng_port ng_miss_port same_port base_port < <(free_ports 5)
    start_mock 1000000 --output-bytes "$OUTPUT_BYTES"
    PIDS[mock-direct]=${PIDS[mock]}
    start_gateway gateway "$gw_port" "$MISS_CFG"
    [ -n "${BASELINE:-}" ] && start_gateway gateway-baseline "$base_port" "$MISS_CFG" "$BASELINE"
    servers="gateway ${BASELINE:+gateway-baseline }nginx mock-direct gateway-on-load-cpu"
    # The same gateway on the load generator's CPU: every hop is then a switch on one CPU
    # instead of a wake-up of the other (idle) one, which shows what the placement costs.
    SERVER_CPU=$LOAD_CPU start_gateway gateway-on-load-cpu "$same_port" "$MISS_CFG"
    start_nginx "$ng_port" "$ng_miss_port"
    miss_path=$(run_path 5 1)
    declare -A miss_port=([gateway]=$gw_port [nginx]=$ng_miss_port [mock-direct]=$MOCK_PORT
        [gateway-on-load-cpu]=$same_port [gateway-baseline]=$base_port)
    for s in $servers; do
        curl -s -o /dev/null -H "Authorization: Bearer $KEY" \
            "http://127.0.0.1:${miss_port[$s]}$miss_path"
    done
    for run in $(seq "$RUNS"); do
        for s in $servers; do
            # Every request carries the key, which only the mock needs: the proxies replace it.
            run_wrk "5-miss-path" "$s" "$run" 1 "http://127.0.0.1:${miss_port[$s]}$miss_path" \
                "WRK_AUTH=Bearer $KEY"
        done
    done
    record hwm "5-miss-path" gateway "$(status_kb gateway VmHWM)"
    record hwm "5-miss-path" nginx "$(status_kb nginx VmHWM)"
    unset "PIDS[mock-direct]"
    stop gateway
    stop gateway-on-load-cpu
    [ -n "${BASELINE:-}" ] && stop gateway-baseline
    stop nginx
    stop mock
}

# --- scenario 6: miss path at random -------------------------------------------------------

scenario_6() {
    log "scenario 6: miss path, $RANDOM_RUNS running runs at random, -c$CONNS"
    local gw_port ng_port ng_miss_port base_port shared_port redis_port proxy_port inline_port run s
    local shared=""
    read -r gw_port ng_port ng_miss_port base_port shared_port redis_port proxy_port inline_port \
        < <(free_ports 8)
    # Every run id is a run that stays running: with running_ttl = 0s each request goes upstream.
    start_mock 1000000 --output-bytes "$OUTPUT_BYTES"
    PIDS[mock-direct]=${PIDS[mock]}
    start_gateway gateway "$gw_port" "$MISS_CFG"
    # The stack's own floor for a proxy: hyper's server and hyper-util's pooled client, the
    # answer read whole and sent back, nothing else.
    start bare-proxy "$SERVER_CPU" "$BARE" "127.0.0.1:$proxy_port" "$OUTPUT_BYTES" \
        "proxy=http://127.0.0.1:$MOCK_PORT"
    wait_http "http://127.0.0.1:$proxy_port/"
    # The same with no task between the two connections: each client connection drives its own
    # upstream connection on its own task, as an nginx worker does.
    start bare-inline "$SERVER_CPU" "$BARE" "127.0.0.1:$inline_port" "$OUTPUT_BYTES" \
        "proxy-inline=http://127.0.0.1:$MOCK_PORT"
    wait_http "http://127.0.0.1:$inline_port/"
    [ -n "${BASELINE:-}" ] && start_gateway gateway-baseline "$base_port" "$MISS_CFG" "$BASELINE"
    # With redis-server installed: the same gateway with the shared tier on (a Redis on the
    # load CPU), so a fleet miss is measured beside a lone one.
    if command -v redis-server >/dev/null; then
        start redis "$LOAD_CPU" redis-server --port "$redis_port" --bind 127.0.0.1 --save "" \
            --appendonly no
        sleep 0.5
        start_gateway gateway-shared "$shared_port" \
            "$(write_config miss-shared "$(cat "$MISS_CFG")"$'\n[shared]\nurls = ["redis://127.0.0.1:'"$redis_port"'"]')"
        shared="gateway-shared "
    fi
    local servers="gateway ${BASELINE:+gateway-baseline }${shared}nginx bare-proxy bare-inline"
    servers+=" mock-direct"
    start_nginx "$ng_port" "$ng_miss_port"
    declare -A miss_port=([gateway]=$gw_port [nginx]=$ng_miss_port [mock-direct]=$MOCK_PORT
        [gateway-baseline]=$base_port [gateway-shared]=$shared_port [bare-proxy]=$proxy_port
        [bare-inline]=$inline_port)
    for run in $(seq "$RUNS"); do
        for s in $servers; do
            run_wrk "6-miss-random-$RANDOM_RUNS" "$s" "$run" "$CONNS" \
                "http://127.0.0.1:${miss_port[$s]}" "WRK_RUNS=$RANDOM_RUNS" "WRK_PREFIX=6" \
                "WRK_AUTH=Bearer $KEY"
        done
    done
    record hwm "6-miss-random-$RANDOM_RUNS" gateway "$(status_kb gateway VmHWM)"
    record hwm "6-miss-random-$RANDOM_RUNS" nginx "$(status_kb nginx VmHWM)"
    unset "PIDS[mock-direct]"
    stop gateway
    stop bare-proxy
    stop bare-inline
    [ -n "${BASELINE:-}" ] && stop gateway-baseline
    if [ -n "$shared" ]; then
        stop gateway-shared
        stop redis
    fi
    stop nginx
    stop mock
}

# --- memory ----------------------------------------------------------------------------------

memory() {
    local section="memory: $MEMORY_RUNS terminal runs of ~2 KB, $1" cfg=$2 gw_port
    read -r gw_port < <(free_ports 1)
    start_mock 0 --output-bytes "$MEMORY_OUTPUT_BYTES"
    start_gateway gateway "$gw_port" "$cfg"
    # A first 1,000 runs over the same number of connections, so "before" already holds the
    # runtime's and the connections' memory and the difference is what the next entries cost.
    loadgen warm --addr "127.0.0.1:$gw_port" --prefix 6 --count 1000 --conc 32 >/dev/null
    sleep 0.5
    local before after fill body
    wait_quiet
    before=$(status_kb gateway VmRSS)
    fill=$(loadgen warm --addr "127.0.0.1:$gw_port" --prefix 7 --count "$MEMORY_RUNS" --conc 32)
    sleep 0.5
    after=$(status_kb gateway VmRSS)
    body=$(sed -n 's/^body_bytes=//p' <<<"$fill")
    kv "$section" entries "$MEMORY_RUNS"
    kv "$section" fill_rps "$(sed -n 's/^rps=//p' <<<"$fill")"
    kv "$section" fill_upstream_misses "$(sed -n 's/^x_cache_miss=//p' <<<"$fill")"
    kv "$section" body_bytes "$body"
    kv "$section" mean_body_bytes $((body / MEMORY_RUNS))
    kv "$section" rss_before_kb "$before"
    kv "$section" rss_after_kb "$after"
    kv "$section" overhead_bytes_per_entry $(( ((after - before) * 1024 - body) / MEMORY_RUNS ))
    local up0 reread
    up0=$(upstream_count)
    reread=$(loadgen warm --addr "127.0.0.1:$gw_port" --prefix 7 --count "$MEMORY_RUNS" --conc 32)
    kv "$section" reread_hits "$(sed -n 's/^x_cache_hit=//p' <<<"$reread")"
    kv "$section" reread_upstream_requests $(($(upstream_count) - up0))
    kv "$section" rss_after_reread_kb "$(status_kb gateway VmRSS)"
    stop gateway
    stop mock
}

scenario_memory() {
    log "memory: $MEMORY_RUNS cached runs"
    # Room for every entry (512 MiB), so nothing is evicted while the memory is measured.
    local room=$'[cache]\nmax_bytes = 536870912'
    memory "access log on" "$(write_config memory "$room")"
    memory "access log off" "$(write_config memory-nolog "$room"$'\n[log]\naccess_log = false')"
    # The cache's own records alone: exact-size bodies inserted in-process, no fetch path.
    wait_quiet
    taskset -c "$SERVER_CPU" "$TARGET/examples/body-retention" cache "$MEMORY_RUNS" \
        "$MEMORY_OUTPUT_BYTES" | kv_from "memory: the cache's own records (in-process, no fetch path)"
}

for s in $ONLY; do
    "scenario_$s"
done

# --- report ----------------------------------------------------------------------------------

mkdir -p "$ROOT/bench-results"
stamp=$(date +%Y%m%d-%H%M%S)
cp "$RESULTS" "$ROOT/bench-results/e2e-$stamp.tsv"
"$LOADGEN" report "$RESULTS" | tee "$ROOT/bench-results/e2e-$stamp.md"
log "written bench-results/e2e-$stamp.md"
