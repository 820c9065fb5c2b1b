#!/usr/bin/env python3
"""Records the exact bytes real Dify SDKs send for the workflow run-detail call and for a
blocking and a streaming run start.

Installs each SDK from its registry (pip into a venv, npm into a folder, both under
CAPTURE_DIR, /tmp/dify-sdk-capture by default), points it at a raw TCP listener on 127.0.0.1
and writes every request it sends, byte for byte, to tests/fixtures/sdk/. The tests replay
those files against the gateway and need neither the network nor the SDKs.

None of the SDKs below has a method of its own for GET /v1/workflows/run/{id} in the version the
registries serve, so the call goes through the SDK's own request function, as a user of that
SDK does for an endpoint it does not wrap; headers, framing and URL joining are the SDK's.

    python3 scripts/capture-sdk-requests.py            # writes tests/fixtures/sdk/*.http
    PY_DIFY_CLIENT=0.1.10 NODE_DIFY_CLIENT=2.3.2 python3 scripts/capture-sdk-requests.py

Not part of the test command: it needs the registries.
"""

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "fixtures" / "sdk"
WORK = Path(os.environ.get("CAPTURE_DIR", "/tmp/dify-sdk-capture"))

# The fake client token the replay tests configure (a `dgw_` token is `dgw_` + 64 hex digits)
# and the run id of tests/common (`RUN`), so the fixtures replay without rewriting either.
TOKEN = "dgw_" + "5eed" * 16
RUN = "3f2a1b0c-9d8e-4f7a-8b6c-5d4e3f2a1b0c"

VERSIONS = {
    "dify-client": os.environ.get("PY_DIFY_CLIENT", "0.1.10"),
    "dify-client-python": os.environ.get("PY_DIFY_CLIENT_PYTHON", "1.0.3"),
    "node-dify-client": os.environ.get("NODE_DIFY_CLIENT", "2.3.2"),
}

RUN_BODY = (
    '{"id":"%s","workflow_id":"wf","status":"succeeded","inputs":"{}","outputs":{},'
    '"error":null,"total_steps":1,"total_tokens":1,"created_at":1700000000,'
    '"finished_at":1700000001,"elapsed_time":1.0}' % RUN
).encode()


BLOCKING_BODY = (
    '{"task_id":"t","workflow_run_id":"%s","data":{"id":"%s","workflow_id":"wf",'
    '"status":"succeeded","outputs":{},"error":null,"elapsed_time":1.0,"total_tokens":1,'
    '"total_steps":1,"created_at":1700000000,"finished_at":1700000001}}' % (RUN, RUN)
).encode()

STREAM_BODY = (
    'data: {"event":"workflow_started","task_id":"t","workflow_run_id":"%s","data":{"id":"%s"}}\n\n'
    'data: {"event":"workflow_finished","task_id":"t","workflow_run_id":"%s","data":{"id":"%s",'
    '"status":"succeeded"}}\n\n' % (RUN, RUN, RUN, RUN)
).encode()


def answer_for(raw: bytes) -> bytes:
    """What the listener answers: a run start in its mode, else a finished run's detail."""
    if raw.startswith(b"POST") and b'"streaming"' in raw:
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
            + STREAM_BODY
        )
    body = BLOCKING_BODY if raw.startswith(b"POST") else RUN_BODY
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body
    )


def read_request(conn: socket.socket) -> bytes:
    """One request as sent: the head, then the body its framing announces."""
    conn.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip().lower()
    if b"content-length" in fields:
        want = int(fields[b"content-length"])
        while len(body) < want:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
    elif fields.get(b"transfer-encoding") == b"chunked":
        while not body.endswith(b"0\r\n\r\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
    return head + b"\r\n\r\n" + body


class Listener:
    """A raw TCP listener that records each request and answers with a finished run."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            with conn:
                raw = read_request(conn)
                with self.lock:
                    self.requests.append(raw)
                conn.sendall(answer_for(raw))

    def take(self) -> list[bytes]:
        with self.lock:
            got, self.requests = self.requests, []
        return got


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, **kw)


def python_env(package: str) -> Path:
    venv = WORK / f"py-{package}-{VERSIONS[package]}"
    if not (venv / "bin" / "python").exists():
        run([sys.executable, "-m", "venv", str(venv)])
        run([str(venv / "bin" / "pip"), "install", "-q", f"{package}=={VERSIONS[package]}"])
    return venv / "bin" / "python"


def node_env() -> Path:
    folder = WORK / f"node-dify-client-{VERSIONS['node-dify-client']}"
    if not (folder / "node_modules" / "dify-client").exists():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_text('{"name":"capture","private":true,"type":"module"}')
        run(["npm", "install", "--silent", f"dify-client@{VERSIONS['node-dify-client']}"], cwd=folder)
    return folder


# Each SDK's run-detail call; BASE is the API root a user configures (`.../v1`).
PY_DIFY_CLIENT = """
import sys
from dify_client import DifyClient
c = DifyClient(sys.argv[1])
c.base_url = sys.argv[2]
r = c._send_request("GET", "/workflows/run/" + sys.argv[3])
assert r.status_code == 200 and r.json()["id"] == sys.argv[3], r.text
"""

PY_DIFY_CLIENT_PYTHON = """
import sys
from dify_client import Client
c = Client(api_key=sys.argv[1], api_base=sys.argv[2])
r = c.request(c._prepare_url("/workflows/run/{id}", id=sys.argv[3]), "GET")
assert r.status_code == 200 and r.json()["id"] == sys.argv[3], r.text
"""

NODE_DIFY_CLIENT = """
import { DifyClient } from "dify-client";
const [token, base, run] = process.argv.slice(2);
const r = await new DifyClient(token, base).sendRequest("GET", `/workflows/run/${run}`);
if (r.status !== 200 || r.data.id !== run) throw new Error(JSON.stringify(r.data));
"""


# Each SDK's run start, blocking then streaming (argv[4]); the SDK's own request function and,
# for Node, its `runWorkflow`. The streaming answer is read to its end.
PY_DIFY_CLIENT_RUN = """
import sys
from dify_client import DifyClient
c = DifyClient(sys.argv[1])
c.base_url = sys.argv[2]
mode = sys.argv[4]
r = c._send_request("POST", "/workflows/run",
                    {"inputs": {"q": "hi"}, "response_mode": mode, "user": "abc-123"},
                    stream=(mode == "streaming"))
assert r.status_code == 200, r.text
text = b"".join(r.iter_content(None)).decode()
assert "succeeded" in text, text
"""

NODE_DIFY_CLIENT_RUN = """
import { CompletionClient } from "dify-client";
const [token, base, run, mode] = process.argv.slice(2);
const stream = mode === "streaming";
const r = await new CompletionClient(token, base).runWorkflow({ q: "hi" }, "abc-123", stream);
if (r.status !== 200) throw new Error(String(r.status));
if (stream) { let t = ""; for await (const c of r.data) t += c; if (!t.includes("succeeded")) throw new Error(t); }
else if (r.data.data.status !== "succeeded") throw new Error(JSON.stringify(r.data));
"""


def capture(listener: Listener, name: str, cmd: list[str], cwd=None) -> None:
    run(cmd, cwd=cwd)
    got = listener.take()
    if len(got) != 1:
        sys.exit(f"{name}: expected one request, got {len(got)}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.http").write_bytes(got[0])
    print(f"{name}: {len(got[0])} bytes", file=sys.stderr)


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    listener = Listener()
    base = f"http://127.0.0.1:{listener.port}/v1"
    args = [TOKEN, base, RUN]

    py = python_env("dify-client")
    capture(listener, f"python-dify-client-{VERSIONS['dify-client']}-get-run",
            [str(py), "-c", PY_DIFY_CLIENT, *args])

    py = python_env("dify-client-python")
    capture(listener, f"python-dify-client-python-{VERSIONS['dify-client-python']}-get-run",
            [str(py), "-c", PY_DIFY_CLIENT_PYTHON, *args])

    py = python_env("dify-client")
    for mode in ("blocking", "streaming"):
        capture(listener, f"python-dify-client-{VERSIONS['dify-client']}-run-{mode}",
                [str(py), "-c", PY_DIFY_CLIENT_RUN, *args, mode])

    node = node_env()
    run_script = node / "capture-run.mjs"
    run_script.write_text(NODE_DIFY_CLIENT_RUN)
    for mode in ("blocking", "streaming"):
        capture(listener, f"node-dify-client-{VERSIONS['node-dify-client']}-run-{mode}",
                ["node", str(run_script), *args, mode], cwd=node)

    script = node / "capture.mjs"
    script.write_text(NODE_DIFY_CLIENT)
    version = VERSIONS["node-dify-client"]
    capture(listener, f"node-dify-client-{version}-get-run", ["node", str(script), *args], cwd=node)
    # A base URL written with a trailing slash, as many configurations have it: the SDK joins
    # by concatenation and sends `/v1//workflows/run/{id}`.
    capture(listener, f"node-dify-client-{version}-get-run-base-url-slash",
            ["node", str(script), TOKEN, base + "/", RUN], cwd=node)


if __name__ == "__main__":
    main()
