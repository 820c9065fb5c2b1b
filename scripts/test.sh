#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing (redis-server, for the
# shared-tier tests), then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        echo "installing redis-server (needed by the shared-tier tests)..."
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
    else
        echo "redis-server is not installed and apt-get is not available; install Redis or Valkey" >&2
        exit 1
    fi
fi

exec cargo test --locked "$@"
