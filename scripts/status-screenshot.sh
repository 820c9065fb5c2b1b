#!/usr/bin/env bash
# Saves a screenshot of the admin status page (docs/status.png) as a real browser renders it:
# starts `dify-gateway demo` (offline, loopback only), sends it a little traffic with curl, loads
# http://127.0.0.1:<admin port>/ in Debian's headless chromium, and stops everything.
#
#   scripts/status-screenshot.sh [OUT.png]
#
# Needs: cargo, curl, chromium (apt-get install chromium). Runs chromium with --no-sandbox when
# run as root (containers).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/status.png}"
chromium="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}"
[ -n "$chromium" ] || { echo "chromium not found (apt-get install chromium)" >&2; exit 1; }

cargo build --quiet --bin dify-gateway
bin="${CARGO_TARGET_DIR:-target}/debug/dify-gateway"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pub=$(port); admin=$(port)
work=$(mktemp -d)
"$bin" demo --listen "127.0.0.1:$pub" --admin-listen "127.0.0.1:$admin" --running-for 1s \
  >"$work/demo.log" 2>&1 &
gw=$!
cleanup() { kill "$gw" 2>/dev/null || true; wait "$gw" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$admin/healthz" >/dev/null && break
  sleep 0.1
done

# A few runs, polled until they end (each is counted once when its final answer is fetched),
# then read again from the cache.
runs=$(for _ in $(seq 12); do python3 -c 'import uuid; print(uuid.uuid4())'; done)
for round in $(seq 8); do
  for r in $runs; do curl -s -o /dev/null "http://127.0.0.1:$pub/v1/workflows/run/$r"; done
  sleep 0.25
done
curl -s -o /dev/null "http://127.0.0.1:$pub/v1/workflows/run/00000000-0000-4000-8000-000000000000"

sandbox=()
[ "$(id -u)" = 0 ] && sandbox=(--no-sandbox)
mkdir -p "$(dirname "$out")"
# Keep traffic flowing while the page takes its two samples (requests per second needs two).
( for _ in $(seq 40); do
    for r in $runs; do curl -s -o /dev/null "http://127.0.0.1:$pub/v1/workflows/run/$r"; done
    sleep 0.1
  done ) &
load=$!
"$chromium" --headless "${sandbox[@]}" --disable-gpu --hide-scrollbars \
  --user-data-dir="$work/chromium" --virtual-time-budget=4500 \
  --window-size=1200,900 --screenshot="$out" "http://127.0.0.1:$admin/" 2>"$work/chromium.log" \
  || { cat "$work/chromium.log" >&2; exit 1; }
kill "$load" 2>/dev/null || true
wait "$load" 2>/dev/null || true
echo "saved $out"
