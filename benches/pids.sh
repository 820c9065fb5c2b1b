# Sourced by the bench scripts: stops what they started, by the pids they recorded.

PIDS=()

# stop_pids SECS : SIGINT to every pid in PIDS, up to SECS seconds each to exit, then SIGKILL.
stop_pids() {
    local p
    for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        timeout "$1" tail --pid="$p" -f /dev/null 2>/dev/null || kill -KILL "$p" 2>/dev/null || true
    done
}
