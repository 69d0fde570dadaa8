#!/usr/bin/env bash
# The main job: installs what is missing, builds Ferry (release), runs `ferry demo`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
swift build -c release
exec ./.build/release/ferry demo "$@"
