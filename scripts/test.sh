#!/usr/bin/env bash
# Install care_ext from nothing into .venv (CPU torch 2.13.0, native CPU kernels, OpenRLHF's CPU
# dependencies for the adapter tests) and run the tests with the native library required, then the
# core's tests through the fused step's CPU twin (as bench/gpu_check.sh runs them on CUDA), then the
# fallback run with the library disabled.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh requirements-dev.txt --openrlhf
. .venv/bin/activate

run_pytest() {  # pytest exit 5 = "no tests collected": an error for the main run, fine for a filter
  local allow_empty=$1; shift
  local rc=0
  pytest "$@" || rc=$?
  if [ "$rc" -eq 5 ] && [ "$allow_empty" = yes ]; then rc=0; fi
  if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; fi
  return "$rc"
}

# The console script `pytest` (not `python -m pytest`) keeps the source tree off sys.path, so the
# installed package with its compiled library is what the tests import.
echo "== tests, native library required"
CARE_EXT_REQUIRE_NATIVE=1 run_pytest no -q tests "$@"
echo "== the core through the fused step (CARE_EXT_FUSED_STEP=1: its CPU twin)"
CARE_EXT_FUSED_STEP=1 CARE_EXT_REQUIRE_NATIVE=1 run_pytest yes -q -m "not slow" tests/core "$@"
echo "== fallback run, native library disabled: the core on the reference ops"
CARE_EXT_DISABLE_NATIVE=1 run_pytest yes -q -m "not native and not slow" tests/ops tests/core "$@"
