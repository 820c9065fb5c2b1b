#!/usr/bin/env bash
# Soak test: builds the release gateway and the soak example, then runs the soak (the gateway
# binary in front of the mock Dify, mixed load with injected faults, then a graceful shutdown
# under load). Arguments go to the example, e.g. `scripts/soak.sh --seconds 30`.
#
# Exit status is the soak's: 0 all invariants held, 1 an invariant failed, 2 it could not run.
# The report is bench-results/soak-<date>.md (gitignored), beside the gateway's log.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --bin dify-gateway --example soak

# A safety net only: the soak stops by itself after --seconds plus about 20 s.
seconds=120
out=bench-results
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --seconds) seconds="${args[i + 1]:-120}" ;;
        --seconds=*) seconds="${args[i]#--seconds=}" ;;
        --out) out="${args[i + 1]:-bench-results}" ;;
        --out=*) out="${args[i]#--out=}" ;;
    esac
done

marker="$(mktemp)"
trap 'rm -f "$marker"' EXIT
status=0
timeout --kill-after=10 "$((seconds + 120))" \
    "${CARGO_TARGET_DIR:-target}/release/examples/soak" "$@" || status=$?

report="$(find "$out" -maxdepth 1 -name 'soak-*.md' -newer "$marker" 2>/dev/null | sort | tail -n 1)"
if [[ -n "$report" ]]; then
    echo "soak report: $report"
else
    echo "soak: no report written (exit status $status)" >&2
fi
exit "$status"
