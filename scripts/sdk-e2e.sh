#!/usr/bin/env bash
# Real Dify SDKs end to end through the gateway: installs the Python (`dify-client`, PyPI) and
# Node (`dify-client`, npm) SDKs into a temporary folder, starts `dify-gateway demo` (the gateway
# in front of its built-in mock Dify, loopback only) and runs a blocking and a streaming workflow
# with each SDK. Needs the package registries; not part of scripts/test.sh.
#
#     scripts/sdk-e2e.sh                      # SDK versions below
#     PY_DIFY_CLIENT=0.1.10 NODE_DIFY_CLIENT=2.3.2 scripts/sdk-e2e.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY_VERSION="${PY_DIFY_CLIENT:-0.1.10}"
NODE_VERSION="${NODE_DIFY_CLIENT:-2.3.2}"
WORK="$(mktemp -d)"
GW_PID=""
cleanup() {
    [ -n "$GW_PID" ] && kill "$GW_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cargo build --quiet --bin dify-gateway
PORT="$(free_port)"
ADMIN="$(free_port)"
target/debug/dify-gateway demo --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN" \
    >"$WORK/gateway.log" 2>&1 &
GW_PID=$!
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done
BASE="http://127.0.0.1:$PORT/v1"
# Demo mode runs open: any token is let in and none is passed on (the mock gets its own key).
TOKEN="any-client-token"

python3 -m venv "$WORK/py"
"$WORK/py/bin/pip" install -q "dify-client==$PY_VERSION"
mkdir -p "$WORK/node"
echo '{"name":"sdk-e2e","private":true,"type":"module"}' >"$WORK/node/package.json"
(cd "$WORK/node" && npm install --silent "dify-client@$NODE_VERSION" >/dev/null)

echo "== python dify-client $PY_VERSION"
"$WORK/py/bin/python" - "$TOKEN" "$BASE" <<'PY'
import json, sys
from dify_client import DifyClient
c = DifyClient(sys.argv[1])
c.base_url = sys.argv[2]
body = {"inputs": {"q": "hi"}, "response_mode": "blocking", "user": "e2e-py"}
r = c._send_request("POST", "/workflows/run", body)
assert r.status_code == 200, r.text
print("blocking:", r.json()["data"]["status"])
body["response_mode"] = "streaming"
r = c._send_request("POST", "/workflows/run", body, stream=True)
assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
events = [json.loads(l[6:])["event"] for l in r.iter_lines(decode_unicode=True) if l.startswith("data: ")]
assert events[0] == "workflow_started" and events[-1] == "workflow_finished", events
print("streaming:", len(events), "events,", " ".join(dict.fromkeys(events)))
PY

echo "== node dify-client $NODE_VERSION"
cat >"$WORK/node/run.mjs" <<'JS'
import { CompletionClient } from "dify-client";
const [token, base] = process.argv.slice(2);
const c = new CompletionClient(token, base);
const b = await c.runWorkflow({ q: "hi" }, "e2e-node", false);
if (b.status !== 200) throw new Error(`blocking ${b.status}`);
console.log("blocking:", b.data.data.status);
const s = await c.runWorkflow({ q: "hi" }, "e2e-node", true);
let text = "";
for await (const chunk of s.data) text += chunk;
const events = text.split("\n").filter((l) => l.startsWith("data: ")).map((l) => JSON.parse(l.slice(6)).event);
if (events[0] !== "workflow_started" || events.at(-1) !== "workflow_finished") throw new Error(events.join(","));
console.log("streaming:", events.length, "events,", [...new Set(events)].join(" "));
JS
node "$WORK/node/run.mjs" "$TOKEN" "$BASE"

echo "sdk-e2e: ok"
