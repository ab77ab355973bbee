#!/usr/bin/env bash
# Install care_ext from nothing into .venv (CPU torch 2.13.0, native CPU kernels) and run the tests
# with the native library required, then the fallback run with it disabled.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0
pip install -q -r requirements-dev.txt
# OpenRLHF 0.11.2 without its GPU-only packages, for the adapter tests (docs/openrlhf.md)
pip install -q -r requirements-openrlhf.txt
pip install -q --no-deps openrlhf==0.11.2
CARE_EXT_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} pip install -q --no-build-isolation .

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
echo "== fallback run, native library disabled"
CARE_EXT_DISABLE_NATIVE=1 run_pytest yes -q -m "not native and not slow" tests/ops "$@"
