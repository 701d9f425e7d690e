#!/usr/bin/env bash
# Headless Chromium for the tests that render report.html (make test runs this when no browser is on PATH).
# Debian/Ubuntu as root, or with passwordless sudo; elsewhere it says what to do and fails.
set -euo pipefail
for b in chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null 2>&1; then exit 0; fi
done
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_chromium: no apt-get here; install Chromium yourself or run make test with GEMTUNE_SKIP_CHROMIUM=1" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        echo "setup_chromium: not root and no passwordless sudo; run 'apt-get install chromium' as root" \
             "or run make test with GEMTUNE_SKIP_CHROMIUM=1" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium >/dev/null
