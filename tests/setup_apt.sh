#!/usr/bin/env bash
# A Debian package some tests need, installed when none of its commands is on PATH (make test runs this for
# headless Chromium and redis-server). Debian/Ubuntu as root, or with passwordless sudo; elsewhere it says what to
# do and fails.
#   setup_apt.sh PACKAGE "COMMAND..." SKIP_VARIABLE     e.g. setup_apt.sh chromium "chromium google-chrome" GEMTUNE_SKIP_CHROMIUM
set -euo pipefail
PKG=$1; CMDS=$2; SKIP=$3
for b in $CMDS; do
    if command -v "$b" >/dev/null 2>&1; then exit 0; fi
done
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_apt: no apt-get here; install $PKG yourself or run make test with $SKIP=1" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        echo "setup_apt: not root and no passwordless sudo; run 'apt-get install $PKG' as root" \
             "or run make test with $SKIP=1" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "$PKG" >/dev/null
command -v "${CMDS%% *}" >/dev/null
