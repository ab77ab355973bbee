#!/usr/bin/env bash
# The README's main command: install care_ext into .venv (if needed) and run the CPU miniature.
#   bash scripts/lab.sh            # the `quick` preset: GT, TTRL, Random, Oracle, CARE; table + plots
#   bash scripts/lab.sh smoke      # any arguments go to the lab's CLI
# It runs the installed console script `care-lab`: `python -m training.lab` from the repository
# root would import the source tree's care_ext, which has no compiled library.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
exec care-lab "$@"
