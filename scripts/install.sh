#!/usr/bin/env bash
# Set up .venv from nothing: torch 2.13.0 (CPU build), care_ext with its native CPU kernels, and
# the requirement files named as arguments (e.g. requirements-dev.txt). Source-free: run as
#   bash scripts/install.sh [requirements-file ...] [--openrlhf]
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0
pip install -q -r requirements.txt
for arg in "$@"; do
  case "$arg" in
    --openrlhf)  # OpenRLHF 0.11.2 without its GPU-only packages (docs/openrlhf.md)
      pip install -q -r requirements-openrlhf.txt
      pip install -q --no-deps openrlhf==0.11.2 ;;
    *) pip install -q -r "$arg" ;;
  esac
done
CARE_EXT_CUDA=${CARE_EXT_CUDA:-0} MAX_JOBS=${MAX_JOBS:-2} pip install -q --no-build-isolation .
