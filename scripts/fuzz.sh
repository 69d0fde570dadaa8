#!/usr/bin/env bash
# Fuzzes FerryWire (frame decoder, message decoders, handshake, key files, sealed frames)
# and FerryVM's state-file readers (spec, state, handover, incoming queue)
# with libFuzzer for SECONDS (default 30), starting from a seed corpus of valid inputs.
#
#   scripts/fuzz.sh [SECONDS]     build (if needed), seed, fuzz
#   scripts/fuzz.sh --build-only  build the fuzz binary only (scripts/test.sh does, before
#                                 `swift test`, so that no compiler runs beside the tests)
#
# The fuzz build has its own scratch path, .build/fuzz (swift-crypto's BoringSSL is built
# again there: about 70 s from clean on 2 cores, then about a second when nothing changed).
# Corpus, seeds and crash files go to $FERRY_FUZZ_DIR (default .build/fuzz). A crash fails
# the script and leaves its input in $FERRY_FUZZ_DIR/artifacts/; replay it with the normal
# build: `swift build --product ferry-fuzz && .build/debug/ferry-fuzz FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."

scratch=.build/fuzz
binary=$scratch/release/ferry-fuzz
work=${FERRY_FUZZ_DIR:-$scratch}

build() {
    swift build -c release --scratch-path "$scratch" --product ferry-fuzz \
        -Xswiftc -sanitize=fuzzer -Xswiftc -DFERRY_LIBFUZZER
}

if [[ ${1:-} == --build-only ]]; then
    build
    exit 0
fi
seconds=${1:-30}
if ! [[ $seconds =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: scripts/fuzz.sh [SECONDS] | --build-only" >&2
    exit 2
fi
build

mkdir -p "$work/corpus" "$work/artifacts"
"$binary" --write-seeds "$work/seeds"
artifacts_before=$(find "$work/artifacts" -type f | wc -l)

# New inputs go to the first directory (the corpus, kept between runs); seeds are read only.
# -timeout: an input that takes 10 s is a hang (the slowest take milliseconds).
# SWIFT_BACKTRACE: Swift's backtracer would take the trap's SIGILL first, and libFuzzer
# then neither sees the crash nor saves its input.
status=0
SWIFT_BACKTRACE=enable=no "$binary" "$work/corpus" "$work/seeds" \
    -max_total_time="$seconds" -print_final_stats=1 -max_len=65536 -timeout=10 \
    -artifact_prefix="$work/artifacts/" || status=$?

artifacts_after=$(find "$work/artifacts" -type f | wc -l)
if (( status != 0 || artifacts_after > artifacts_before )); then
    echo "fuzz.sh: libFuzzer found a crash (exit status $status); inputs in $work/artifacts/:" >&2
    ls -l "$work/artifacts" >&2
    exit 1
fi
