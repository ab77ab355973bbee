#!/usr/bin/env bash
# Compile every C++/CUDA source of csrc/ against the headers of another torch release, without
# installing it: the GPU machine runs torch 2.11 while CI builds against 2.13 (CPU) and 2.14.1
# (CUDA), so an ATen API that is newer than the GPU machine's torch would only show there, and
# cost a device session its build. Syntax/semantic check only (g++ -fsyntax-only, nvcc -c to
# /dev/null for sm_90); nothing is linked or run.
#
#   bash scripts/check_torch_headers.sh [TORCH_VERSION=2.11.0]
set -euo pipefail
cd "$(dirname "$0")/.."
ver=${1:-2.11.0}
work=${TMPDIR:-/tmp}/care_ext_torch_headers_$ver
mkdir -p "$work"
if [ ! -d "$work/torch/include" ]; then
  python3 -m pip download -q --no-deps "torch==$ver" -d "$work/wheel"
  (cd "$work" && python3 -m zipfile -e wheel/torch-"$ver"-*.whl unpacked > /dev/null \
     && mv unpacked/torch . && rm -rf unpacked wheel)
fi
inc="$work/torch/include"
pyinc=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
# setup.py's -DCARE_EXT_* build-info strings are left out: csrc/registration.cpp defaults them.
flags=(-std=c++17 -I"$inc" -I"$inc/torch/csrc/api/include" -I"$pyinc")
fail=0
for f in csrc/*.cpp csrc/cpu/*.cpp; do
  g++ -fsyntax-only -Wall -Wextra -Wno-unused-parameter "${flags[@]}" "$f" || { echo "FAILED: $f"; fail=1; }
done
if command -v nvcc > /dev/null; then
  for f in csrc/cuda/*.cu csrc/cuda/*.cpp; do
    nvcc -arch=sm_90 -x cu -c -o /dev/null -DCARE_EXT_WITH_CUDA "${flags[@]}" "$f" \
      || { echo "FAILED: $f"; fail=1; }
  done
else
  echo "nvcc not found: CUDA sources not checked" >&2
fi
[ $fail -eq 0 ] && echo "csrc/ compiles against torch $ver headers"
exit $fail
