#!/usr/bin/env bash
# redis-server for the tests of the shared route store and the cluster (make test runs this when none is on PATH).
# Debian/Ubuntu as root, or with passwordless sudo; elsewhere it says what to do and fails.
set -euo pipefail
for b in redis-server; do
    if command -v "$b" >/dev/null 2>&1; then exit 0; fi
done
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_redis: no apt-get here; install redis-server yourself or run make test with GEMTUNE_SKIP_REDIS=1" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        echo "setup_redis: not root and no passwordless sudo; run 'apt-get install redis-server' as root" \
             "or run make test with GEMTUNE_SKIP_REDIS=1" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
command -v redis-server >/dev/null
