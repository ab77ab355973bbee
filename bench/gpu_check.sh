#!/usr/bin/env bash
# The one prepared call on the GPU machine (H100/H200, torch 2.11+cu130 preinstalled, no network):
# build from source, CUDA tests, benchmarks, ptxas/SASS reports, compute-sanitizer; everything
# lands under $OUT (default bench/out/gpu). Designed to finish well inside 8 minutes.
#
#   device run:  bash bench/gpu_check.sh
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/bench/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/summary.txt"; }

stamp "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
  nvcc --version | tail -2; } >> "$OUT/summary.txt" 2>&1

stamp "build (CARE_EXT_CUDA=1, sm_90, ptxas -v)"
cd "$REPO"
rm -rf build
CARE_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 CARE_EXT_PTXAS_VERBOSE=1 \
  python3 -m pip install -v --no-build-isolation --no-deps . > "$OUT/build.log" 2>&1
rc=$?
stamp "build exit $rc"
grep -E "Compiling entry|Used [0-9]+ registers|spill" "$OUT/build.log" | sed 's/^ *//' \
  | sort -u > "$OUT/ptxas.txt"
[ $rc -eq 0 ] || { tail -50 "$OUT/build.log"; exit 1; }

cd /tmp  # keep the source tree off sys.path: tests import the installed package
python3 -c "import care_ext, json; print(json.dumps(care_ext.build_info()))" | tee -a "$OUT/summary.txt"

stamp "SASS of the kernels (wide loads, no local-memory spills)"
SO=$(python3 -c "import care_ext._C as m; print(m.__file__)")
cuobjdump --dump-sass "$SO" > "$OUT/sass.txt" 2>&1
grep -c -E "LDL|STL" "$OUT/sass.txt" | sed 's/^/local-memory instructions (LDL|STL): /' >> "$OUT/summary.txt"

stamp "op tests (CPU and CUDA)"
CARE_EXT_REQUIRE_NATIVE=1 timeout 200 python3 -m pytest -q -x -p no:cacheprovider \
  --rootdir "$REPO" "$REPO/tests/ops" > "$OUT/tests.log" 2>&1
stamp "tests exit $? : $(tail -1 "$OUT/tests.log")"

stamp "benchmarks: the whole step first (the goals' shapes), then every op"
timeout 150 python3 "$REPO/bench/bench_ops.py" --device cuda --min-time 0.2 \
  --ops acquisition_step acquisition_step_fused --shapes 64x8x4096 1024x64x4096 512x16x4096 64x8x2048 \
  --out "$OUT/bench_step_ops" > "$OUT/bench.log" 2>&1
stamp "bench (step) exit $? : $(grep -E '64x8x4096|1024x64x4096' "$OUT/bench.log" | tr -s ' ' | tr '\n' ';')"
timeout 100 python3 "$REPO/bench/bench_ops.py" --device cuda --min-time 0.1 \
  --ops cluster_stats group_advantage cag classwise_cag expected_cag group_features \
  --shapes 64x8x4096 1024x64x4096 --out "$OUT/bench_ops" >> "$OUT/bench.log" 2>&1
stamp "bench (ops) exit $?"
timeout 90 python3 "$REPO/bench/bench_step.py" --device cuda --steps 4 --warmup 2 --out "$OUT/bench_step" \
  > "$OUT/bench_step.log" 2>&1
stamp "bench_step exit $? : $(grep -E 'decide' "$OUT/bench_step.log" | tr '\n' ' ')"

stamp "compute-sanitizer (memcheck) on every kernel"
cat > /tmp/sanitize_ops.py <<'PY'
import torch, care_ext
from care_ext import reference as R
g = torch.Generator().manual_seed(0)
for B, G in ((0, 8), (1, 1), (37, 8), (5, 64)):
    ids = (torch.rand(B, G, generator=g) * 4).long(); ids[torch.rand(B, G, generator=g) < .2] = -1
    ids = ids.cuda(); r = torch.rand(B, G, device="cuda")
    rank, sizes = torch.ops.care_ext.cluster_stats(ids)
    torch.ops.care_ext.group_advantage(r, 1e-6, True); torch.ops.care_ext.cag(r, r.flip(1), 0., False)
    cag, adm = torch.ops.care_ext.classwise_cag(sizes, 0., False)
    torch.ops.care_ext.expected_cag(torch.randn(B, G + 1, device="cuda"), cag, adm)
    torch.ops.care_ext.group_features(ids, torch.ones(B, G, device="cuda"), 10., 0., False, 1e-6, False)
    H = 40
    w = lambda Fp, Fr, C: [t.cuda() for t in (torch.randn(128, H + Fp), torch.randn(128), torch.randn(64, H + Fr),
                          torch.randn(64), torch.randn(512, 64), torch.randn(512), torch.randn(256, 640),
                          torch.randn(256), torch.randn(C, 256), torch.randn(C))]
    torch.ops.care_ext._acquisition_step_fused(ids, torch.ones(B, G, device="cuda"), torch.randn(B, H, device="cuda"),
        torch.randn(B, G, H, device="cuda").bfloat16(), w(G + 1, 1, 2), w(G + 1, 0, G + 1), 10., 0., False, 1e-6, False)
torch.cuda.synchronize(); print("sanitize script ok")
PY
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 python3 /tmp/sanitize_ops.py \
  > "$OUT/sanitizer.log" 2>&1
stamp "compute-sanitizer exit $? : $(grep -E 'ERROR SUMMARY|sanitize script ok' "$OUT/sanitizer.log" | tr '\n' ' ')"
stamp "done"
