#!/usr/bin/env bash
# The README's main command: install care_ext into .venv (if needed) and run the CPU miniature.
#   bash scripts/lab.sh            # the `quick` preset: GT, TTRL, Random, Oracle, CARE; table + plots
#   bash scripts/lab.sh smoke      # any arguments go to `python -m training.lab`
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
exec python -m training.lab "$@"
