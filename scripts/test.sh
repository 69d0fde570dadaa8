#!/usr/bin/env bash
# The test command: installs what is missing, builds, builds the demo guest, runs every
# test suite (unit, loopback, and as root the lab and end-to-end suites with real QEMU).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
swift build --build-tests
bash scripts/fuzz.sh --build-only  # before the tests, so no compiler runs beside them
export FERRY_GUEST_DIR="${FERRY_GUEST_DIR:-/var/cache/ferry/guest}"
./.build/debug/ferry guest build --out "$FERRY_GUEST_DIR"
export FERRY_BIN="$PWD/.build/debug/ferry"
swift test --skip-build --no-parallel "$@"
