#!/usr/bin/env bash
# The one prepared call on the GPU machine (H100/H200, torch 2.11+cu130 preinstalled, no network):
# build from source, CUDA tests, benchmarks, ptxas/SASS reports, compute-sanitizer; everything
# lands under $OUT (default bench/out/gpu) as summary.txt + gpu_check.tar.gz. Stops at GPU_CHECK_SECONDS (default 480 s: issue 7's 8 minutes), most
# important stages first: build, op tests, the core on CUDA (default and fused step), the whole
# step's benchmark (its PASS/FAIL lines against issue 7's goals go into summary.txt,
# bench/step_goals.py), the device time per kernel of one step call (bench/profile_step.py),
# compute-sanitizer (memcheck on every kernel, racecheck and synccheck on the block- and
# warp-cooperative ones), bench_step three ways (default, fused, split-bf16 first layers), then
# the single ops, the figures (bench/plot_bench.py), the CPU step's thread scaling on the
# machine's 16 cores (bench/thread_scaling.py) and the CPU step with split-bf16 first layers
# (MKL's GEMM and the packed pieces).
#
# Next (prepared 2026-11-28, not yet run): GPU_CHECK_AB="CARE_EXT_TAIL_DOT_AHEAD=0
# CARE_EXT_TAIL_DOT_AHEAD=1" GPU_CHECK_AB_STAMPS=1 GPU_CHECK_SECONDS=300 bash bench/gpu_check.sh
# (~4 min with the start): the head's dots software-pipelined, against the stamps' head layer 1.
#
# GPU_CHECK_QUICK=1: after a kernel change, the checks that need the GPU only (~4 min): build,
# SASS, the CUDA-marked op tests, the core on CUDA with the fused step, the step benchmark without
# torch.compile (with the StepGraph plan), the features' second stream off and on
# (CARE_EXT_STEP_OVERLAP), the prepared head kernel with the plan against the goals, the tail's
# layer-2 variants and the split head (GPU_CHECK_L2 / GPU_CHECK_L2_ROUNDS alternations, default
# ffma mma1 mma1t head, twice), profile_step, Nsight Compute on the
# tail kernel (where ncu exists; per-line stalls as CSV) and the sanitizers, then bench_step and
# profile_update on CUDA, and the CPU split step on packed pieces against MKL's (the host's cores)
# if time is left; the rest is skipped.
#
#   device run:  bash bench/gpu_check.sh            (GPU_CHECK_QUICK=1 bash bench/gpu_check.sh)
#   A/B of one change: GPU_CHECK_AB="CARE_EXT_TAIL_HEAD=tail CARE_EXT_TAIL_HEAD=split" \
#                      GPU_CHECK_TESTS="head or overlap" GPU_CHECK_SECONDS=200 bash bench/gpu_check.sh
#                      (GPU_CHECK_AB_NCU=step_head_kernel: and ncu on that kernel, ~45 s more;
#                      GPU_CHECK_AB_STAMPS=1: the tail's phases per setting, CARE_EXT_TAIL_STAMPS;
#                      GPU_CHECK_AB_SANITIZE=1: compute-sanitizer under the last setting)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
# The device tool brings back at most 8 files from $OUT: every stage writes into a work folder, and
# each stamp refreshes two files in $OUT, summary.txt and gpu_check.tar.gz (all logs and results).
RESULTS=${OUT:-$REPO/bench/out/gpu}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.$(date +%s).XXXXXX")
# it must start empty: on 2026-11-28 both calls' archives also held a 2026-11-28 morning session's
# A/B files (bench_ab_*, ncu_ab_*, profile_ab_*), as if the machine's /tmp and mktemp's name had
# come back; whatever is there is dropped, and said
if [ -n "$(ls -A "$OUT")" ]; then
  echo "gpu_check: $OUT was not empty ($(ls -A "$OUT" | wc -l) entries): removed" >&2
  rm -rf "${OUT:?}"/* "${OUT:?}"/.[!.]* 2> /dev/null
fi
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
stamp() {
  echo "== [$(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/summary.txt"
  cp "$OUT/summary.txt" "$RESULTS/summary.txt"
  tar -czf "$RESULTS/gpu_check.tar.gz.part" -C "$OUT" . && mv "$RESULTS/gpu_check.tar.gz.part" "$RESULTS/gpu_check.tar.gz"
}
# One deadline for the whole script (the device call's limit is 600 s): each stage gets at most its
# own limit and never more than what is left, so the stages in front (the important ones) finish
# and every result so far is already under $OUT when time runs out.
DEADLINE=$(( t0 + ${GPU_CHECK_SECONDS:-480} ))
cap() { local left=$(( DEADLINE - $(date +%s) )); [ "$left" -lt "$1" ] && echo $(( left > 1 ? left : 1 )) || echo "$1"; }

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
[ $rc -eq 0 ] || { tail -50 "$OUT/build.log"; stamp "build failed: see build.log"; exit 1; }

cd /tmp  # keep the source tree off sys.path: tests import the installed package
python3 -c "import care_ext, json; print(json.dumps(care_ext.build_info()))" | tee -a "$OUT/summary.txt"

stamp "SASS of the kernels (bench/sass_report.py: no local memory, hot loops as the source means)"
SO=$(python3 -c "import care_ext._C as m; print(m.__file__)")
timeout "$(cap 60)" python3 "$REPO/bench/sass_report.py" --so "$SO" --check --out "$OUT/sass" \
  > "$OUT/sass_report.log" 2>&1
stamp "sass_report exit $? : $(grep -cE '^PASS' "$OUT/sass_report.log") rules pass; $(grep -E '^(FAIL|loop)' "$OUT/sass_report.log" | tr '\n' ';')"

# The split2 step's launches for Nsight Compute (the A/B mode's and the quick run's ncu stages):
# per shape argument a warm-up call, then the profiled one (ncu --launch-skip 1 per shape)
cat > /tmp/ncu_step.py <<'PY'
import sys, torch, care_ext
from bench_ops import make_inputs, op_calls
for shape in sys.argv[1:]:
    B, G, H = map(int, shape.split("x"))
    fn = op_calls(make_inputs(B, G, H, "cuda", torch.bfloat16), torch.ops.care_ext)["acquisition_step_fused_split2"]
    fn(); torch.cuda.synchronize()  # warm-up launch (skipped by --launch-skip 1 per shape)
    fn(); torch.cuda.synchronize()
PY

# compute-sanitizer's scripts (the quick run's stage; the A/B mode's with GPU_CHECK_AB_SANITIZE=1):
# every kernel on every shape (memcheck), and the block-cooperative kernels on small cases
cat > /tmp/sanitize_ops.py <<'PY'
import torch, care_ext
from care_ext import reference as R
from care_ext.bf16_split import first_layer_split
from care_ext.ops import fused_step_layout
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
    for lay in (list, fused_step_layout):  # row-major and column-major (the core's CUDA layout)
        torch.ops.care_ext._acquisition_step_fused(ids, torch.ones(B, G, device="cuda"), torch.randn(B, H, device="cuda"),
            torch.randn(B, G, H, device="cuda").bfloat16(), lay(w(G + 1, 1, 2)), lay(w(G + 1, 0, G + 1)), 10., 0., False, 1e-6, False)
    s1, s2 = w(G + 1, 1, 2), w(G + 1, 0, G + 1)  # split-bf16 first layers: bf16 GEMMs, fp32 out
    torch.ops.care_ext._acquisition_step_fused_split(ids, torch.ones(B, G, device="cuda"),
        torch.randn(B, H, device="cuda").bfloat16(), torch.randn(B, G, H, device="cuda").bfloat16(), s1, s2,
        10., 0., False, 1e-6, False, first_layer_split(s1, s2, H))
# _copy_into: segments off the 16-byte units, a src 1 byte off alignment, 11 pairs (two launches)
src = [torch.randint(0, 9, (n,), dtype=torch.uint8, device="cuda") for n in (7, 16, 33, 4099)]
src += [torch.randint(0, 9, (1001,), dtype=torch.uint8, device="cuda")[1:], torch.randn(5, 40, device="cuda").bfloat16()]
src += [torch.randn(n, device="cuda") for n in (1, 3, 17, 256, 1 << 16)]
torch.ops.care_ext._copy_into([torch.empty_like(t, memory_format=torch.contiguous_format) for t in src], src)
torch.cuda.synchronize(); print("sanitize script ok")
PY
cat > /tmp/sanitize_sync.py <<'PY'
import torch, care_ext
from bench_ops import make_inputs, op_calls
for G in (64, 8):  # G = 8: the one-prompt tail with CARE_EXT_TAIL_STAGE_H2's staging (fits)
    x = make_inputs(6, G, 64, "cuda", torch.bfloat16)
    for op, fn in op_calls(x, torch.ops.care_ext).items():
        if op.startswith("acquisition_step_fused") or op == "group_features":
            fn()
torch.cuda.synchronize(); print("sync script ok")
PY
# CARE_EXT_TAIL_STAMPS=1: the tail's phases per stage (cycles, median / slowest block; the launch
# prints them to stderr) for the split2 step at each shape argument: a warm-up call, then 3
cat > /tmp/stamps_step.py <<'PY'
import sys, torch, care_ext
from bench_ops import make_inputs, op_calls
for shape in sys.argv[1:]:
    B, G, H = map(int, shape.split("x"))
    fn = op_calls(make_inputs(B, G, H, "cuda", torch.bfloat16), torch.ops.care_ext)["acquisition_step_fused_split2"]
    for _ in range(4):
        fn()
    torch.cuda.synchronize()
PY

# GPU_CHECK_AB="ENV=a ENV=b ...": a focused A/B run after a kernel change, for a short device
# call (~3 min with the start): after the build and SASS, the CUDA tests matching GPU_CHECK_TESTS
# (a pytest -k expression, default: all CUDA op tests), then the split2 step's benchmark under
# each setting in turn, GPU_CHECK_AB_ROUNDS times (default 2), at 64x8, 256x32 and 1024x64
# (eager, replayed, and through StepGraph; with each call's host-only time), and
# profile_step (device time per kernel) under each; then it stops.
if [ -n "${GPU_CHECK_AB:-}" ]; then
  CARE_EXT_REQUIRE_NATIVE=1 timeout "$(cap 90)" python3 -m pytest -q --maxfail=25 -rf -p no:cacheprovider \
    -m cuda ${GPU_CHECK_TESTS:+-k "$GPU_CHECK_TESTS"} --rootdir "$REPO" "$REPO/tests/ops" > "$OUT/tests.log" 2>&1
  stamp "CUDA tests (-k ${GPU_CHECK_TESTS:-all}) exit $? : $(tail -1 "$OUT/tests.log")"
  grep -E "^FAILED" "$OUT/tests.log" | head -25 >> "$OUT/summary.txt"
  for round in $(seq 1 "${GPU_CHECK_AB_ROUNDS:-2}"); do
    for setting in $GPU_CHECK_AB; do
      env "$setting" timeout "$(cap 30)" python3 "$REPO/bench/bench_ops.py" --device cuda --min-time 0.2 \
        --providers native native_graph native_plan --ops acquisition_step_fused_split2 \
        --shapes 64x8x4096 256x32x4096 1024x64x4096 --out "$OUT/bench_ab_${setting//[^A-Za-z0-9]/_}_$round" \
        > "$OUT/bench_ab_${setting//[^A-Za-z0-9]/_}_$round.log" 2>&1
      stamp "bench $setting (round $round) exit $? : $(grep -E '^cuda' "$OUT/bench_ab_${setting//[^A-Za-z0-9]/_}_$round.log" | tr -s ' ' | cut -d' ' -f2,4- | tr '\n' ';')"
    done
  done
  for setting in $GPU_CHECK_AB; do
    env "$setting" timeout "$(cap 30)" python3 "$REPO/bench/profile_step.py" --device cuda \
      --ops acquisition_step_fused_split2 --shapes 64x8x4096 1024x64x4096 \
      --out "$OUT/profile_ab_${setting//[^A-Za-z0-9]/_}" > "$OUT/profile_ab_${setting//[^A-Za-z0-9]/_}.log" 2>&1
    stamp "profile_step $setting exit $? : $(grep -E 'step_tail_kernel|step_head_kernel|device\)' "$OUT/profile_ab_${setting//[^A-Za-z0-9]/_}.log" | tr -s ' ' | cut -c1-60 | tr '\n' ';')"
  done
  # GPU_CHECK_AB_STAMPS=1: the tail's phases per stage under each setting (CARE_EXT_TAIL_STAMPS=1;
  # the last of 4 calls per shape into summary.txt)
  if [ "${GPU_CHECK_AB_STAMPS:-0}" = 1 ]; then
    for setting in $GPU_CHECK_AB; do
      log="$OUT/stamps_${setting//[^A-Za-z0-9]/_}.log"
      env "$setting" CARE_EXT_TAIL_STAMPS=1 PYTHONPATH="$REPO/bench" timeout "$(cap 40)" python3 \
        /tmp/stamps_step.py 64x8x4096 256x32x4096 1024x64x4096 > "$log" 2>&1
      stamp "tail stamps $setting exit $? (the 4th call per shape):"
      grep "care_ext tail stamps" "$log" | awk 'NR % 8 == 7 || NR % 8 == 0' >> "$OUT/summary.txt"
    done
  fi
  # GPU_CHECK_AB_SANITIZE=1: compute-sanitizer under the last setting: memcheck on every kernel and
  # shape, racecheck and synccheck on the block-cooperative kernels
  if [ "${GPU_CHECK_AB_SANITIZE:-0}" = 1 ]; then
    last_setting=${GPU_CHECK_AB##* }
    env "$last_setting" timeout "$(cap 90)" compute-sanitizer --tool memcheck --error-exitcode 9 \
      python3 /tmp/sanitize_ops.py > "$OUT/sanitizer_ab.log" 2>&1
    stamp "compute-sanitizer memcheck ($last_setting) exit $? : $(grep -E 'ERROR SUMMARY|sanitize script ok' "$OUT/sanitizer_ab.log" | tr '\n' ' ')"
    for tool in racecheck synccheck; do
      env "$last_setting" PYTHONPATH="$REPO/bench" timeout "$(cap 60)" compute-sanitizer --tool $tool \
        --error-exitcode 9 python3 /tmp/sanitize_sync.py > "$OUT/sanitizer_ab_$tool.log" 2>&1
      stamp "compute-sanitizer $tool ($last_setting) exit $? : $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|sync script ok' "$OUT/sanitizer_ab_$tool.log" | tr '\n' ' ')"
    done
  fi
  # GPU_CHECK_AB_NCU=kernel: Nsight Compute on that kernel (a name, e.g. step_head_kernel) under
  # the last setting, at 64x8 and 1024x64: speed of light, occupancy, warp states, and per source
  # line where its warps stall (bench/ncu_source.py; the reports stay in /tmp)
  if [ -n "${GPU_CHECK_AB_NCU:-}" ] && command -v ncu > /dev/null; then
    last_setting=${GPU_CHECK_AB##* }
    SO=$(python3 -c "import care_ext._C as m; print(m.__file__)")
    for shape in 64x8x4096 1024x64x4096; do
      env "$last_setting" PYTHONPATH="$REPO/bench" timeout "$(cap 60)" ncu --kernel-name "regex:$GPU_CHECK_AB_NCU" \
        --launch-skip 1 --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats \
        --section WarpStateStats --section SourceCounters -f -o "/tmp/ncu_ab_$shape" \
        python3 /tmp/ncu_step.py $shape > "$OUT/ncu_ab_${shape}_run.log" 2>&1
      rc=$?
      timeout "$(cap 30)" ncu -i "/tmp/ncu_ab_$shape.ncu-rep" --print-details all > "$OUT/ncu_ab_$shape.txt" 2>&1
      timeout "$(cap 30)" ncu -i "/tmp/ncu_ab_$shape.ncu-rep" --page source --csv --print-source sass \
        > "$OUT/ncu_ab_${shape}_sass.csv" 2> /dev/null
      timeout "$(cap 30)" python3 "$REPO/bench/ncu_source.py" --csv "$OUT/ncu_ab_${shape}_sass.csv" --so "$SO" \
        --kernel "$GPU_CHECK_AB_NCU" --top 30 > "$OUT/ncu_ab_source_$shape.txt" 2>&1
      stamp "ncu $GPU_CHECK_AB_NCU ($last_setting) $shape exit $rc : $(grep -E 'Duration|Compute \(SM\) Throughput|Achieved Occupancy' "$OUT/ncu_ab_$shape.txt" | tr -s ' ' | tr '\n' ';') by function: $(sed -n '3,8p' "$OUT/ncu_ab_source_$shape.txt" | tr -s ' ' | cut -c1-60 | tr '\n' ';')"
    done
  fi
  stamp "done (A/B)"
  exit 0
fi

stamp "op tests (CPU and CUDA)"
# not -x: one session must show every failing test (up to 25), not the first one only
QUICK=${GPU_CHECK_QUICK:-0}
MARK=(); [ "$QUICK" = 1 ] && MARK=(-m cuda)  # quick: the CUDA parametrisations only (CI runs the CPU ones)
CARE_EXT_REQUIRE_NATIVE=1 timeout "$(cap 150)" python3 -m pytest -q --maxfail=25 -rf -p no:cacheprovider \
  ${MARK[@]+"${MARK[@]}"} --rootdir "$REPO" "$REPO/tests/ops" > "$OUT/tests.log" 2>&1
stamp "tests exit $? : $(tail -1 "$OUT/tests.log")"
grep -E "^FAILED" "$OUT/tests.log" | head -25 >> "$OUT/summary.txt"
# the fused step's tail with several prompts per block (CARE_EXT_TAIL_PROMPTS; default by B)
[ "$QUICK" = 1 ] || CARE_EXT_TAIL_PROMPTS=4 CARE_EXT_REQUIRE_NATIVE=1 timeout "$(cap 60)" python3 -m pytest -q --maxfail=10 -rf \
  -p no:cacheprovider --rootdir "$REPO" "$REPO/tests/ops/test_ops_classifier.py" -k step \
  > "$OUT/tests_tail_prompts4.log" 2>&1
[ "$QUICK" = 1 ] || stamp "step tests with CARE_EXT_TAIL_PROMPTS=4: exit $? : $(tail -1 "$OUT/tests_tail_prompts4.log")"
FUSED=(0 1); [ "$QUICK" = 1 ] && FUSED=(1)
for fused in "${FUSED[@]}"; do  # the CARE core on the GPU with the default step, then with the fused one
  CARE_EXT_FUSED_STEP=$fused CARE_EXT_REQUIRE_NATIVE=1 timeout "$(cap 60)" python3 -m pytest -q -p no:cacheprovider \
    --rootdir "$REPO" "$REPO/tests/core/test_core_cuda.py" "$REPO/tests/core/test_core_background_update.py" \
    > "$OUT/tests_core_fused$fused.log" 2>&1
  stamp "core on CUDA, CARE_EXT_FUSED_STEP=$fused: exit $? : $(tail -1 "$OUT/tests_core_fused$fused.log")"
done

stamp "benchmarks: the whole step first (the goals' shapes), then every op"
PROV=(native reference compile cudagraph native_graph native_plan)
[ "$QUICK" = 1 ] && PROV=(native reference cudagraph native_graph native_plan)
timeout "$(cap 120)" python3 "$REPO/bench/bench_ops.py" --device cuda --min-time 0.2 --providers "${PROV[@]}" \
  --ops acquisition_step acquisition_step_fused acquisition_step_fused_split acquisition_step_fused_split2 \
  --shapes 64x8x4096 1024x64x4096 512x16x4096 64x8x2048 \
  --out "$OUT/bench_step_ops" > "$OUT/bench.log" 2>&1
stamp "bench (step) exit $? : $(grep -E '64x8x4096|1024x64x4096' "$OUT/bench.log" | tr -s ' ' | tr '\n' ';')"
python3 "$REPO/bench/step_goals.py" "$OUT/bench_step_ops.jsonl" >> "$OUT/summary.txt" 2>&1
# the features kernel and the prompt GEMMs on a second stream beside the rollout GEMM
# (CARE_EXT_STEP_OVERLAP; auto: in graphs and from 4096 rollouts), off and on alternated twice
for round in 1 2; do
  for ov in 0 1; do
    CARE_EXT_STEP_OVERLAP=$ov timeout "$(cap 30)" python3 "$REPO/bench/bench_ops.py" --device cuda \
      --min-time 0.2 --providers native native_graph --ops acquisition_step_fused_split2 \
      --shapes 64x8x4096 512x16x4096 1024x64x4096 --out "$OUT/bench_step_ops_overlap${ov}_$round" \
      > "$OUT/bench_overlap${ov}_$round.log" 2>&1
    stamp "bench CARE_EXT_STEP_OVERLAP=$ov (round $round) exit $? : $(grep -E '^cuda' "$OUT/bench_overlap${ov}_$round.log" | tr -s ' ' | cut -d' ' -f2,4,5 | tr '\n' ';')"
  done
done
# everything prepared without a GPU on 2026-11-28, together: the head split off the tail
# (CARE_EXT_TAIL_HEAD=split), the overlap (auto: on in graphs and from 4096 rollouts) and the
# step through StepGraph (native_plan); against the goals (step_goals.py, into summary.txt)
CARE_EXT_TAIL_HEAD=split timeout "$(cap 40)" python3 "$REPO/bench/bench_ops.py" --device cuda --min-time 0.2 \
  --providers native reference cudagraph native_graph native_plan --ops acquisition_step_fused_split2 \
  --shapes 64x8x4096 1024x64x4096 --out "$OUT/bench_step_ops_prepared" > "$OUT/bench_prepared.log" 2>&1
stamp "bench CARE_EXT_TAIL_HEAD=split + plan exit $? : $(grep -E '^cuda' "$OUT/bench_prepared.log" | tr -s ' ' | tr '\n' ';')"
{ echo "goals with CARE_EXT_TAIL_HEAD=split (and the plan):"
  python3 "$REPO/bench/step_goals.py" "$OUT/bench_step_ops_prepared.jsonl"; } >> "$OUT/summary.txt" 2>&1
TPS=(1 2 4); [ "$QUICK" = 1 ] && TPS=()
for tp in ${TPS[@]+"${TPS[@]}"}; do  # the fused ops with 1, 2 and 4 prompts per tail block (the default picks by B)
  CARE_EXT_TAIL_PROMPTS=$tp timeout "$(cap 45)" python3 "$REPO/bench/bench_ops.py" --device cuda \
    --min-time 0.2 --providers native native_graph --ops acquisition_step_fused acquisition_step_fused_split \
    --shapes 64x8x4096 1024x64x4096 --out "$OUT/bench_step_ops_tail$tp" > "$OUT/bench_tail$tp.log" 2>&1
  stamp "bench CARE_EXT_TAIL_PROMPTS=$tp exit $? : $(grep -E '64x8x4096|1024x64x4096' "$OUT/bench_tail$tp.log" | tr -s ' ' | tr '\n' ';')"
done
# rollout layer 2 on FFMA tiles and on tensor cores (CARE_EXT_TAIL_L2=ffma / mma; auto picks mma
# from G = 16), the latter with its TF32 operands split inside its loop (CARE_EXT_TAIL_MMA_PRESPLIT=0)
# and pre-split (=1, the default: the weight by a kernel before the tail, the inputs by layer 1;
# mma1t: in 4x2 register tiles, CARE_EXT_TAIL_MMA_TILES, half the weight's L2 traffic),
# alternated in one run at G = 8, 16, 32 and 64: the step, then its kernels' device times.
# (CARE_EXT_TAIL_STAGE_R2=1, the layer-2 weight staged in shared memory, lost on the H200 of
# 2026-11-27: 714.8 against 512.9 us of tail at 1024x64x4096; only its racecheck still runs.)
# head: the default layer 2 (auto: ffma at G = 8, mma1 from 16) with the head in a kernel of its
# own (CARE_EXT_TAIL_HEAD=split; compare with the ffma row at 64x8, the mma1 rows above). mma0
# (in-loop split) lost twice on the H200 (2026-11-27) and runs only where named in GPU_CHECK_L2.
l2_env() {  # one layer-2 variant's environment: ffma, mma0 (split in the loop), mma1 (pre-split),
            # mma1t (pre-split, 4x2 tiles), head (auto layer 2, split head)
  case "$1" in
    ffma) echo "CARE_EXT_TAIL_L2=ffma" ;;
    mma0) echo "CARE_EXT_TAIL_L2=mma CARE_EXT_TAIL_MMA_PRESPLIT=0" ;;
    mma1) echo "CARE_EXT_TAIL_L2=mma CARE_EXT_TAIL_MMA_PRESPLIT=1" ;;
    mma1t) echo "CARE_EXT_TAIL_L2=mma CARE_EXT_TAIL_MMA_PRESPLIT=1 CARE_EXT_TAIL_MMA_TILES=4x2" ;;
    head) echo "CARE_EXT_TAIL_L2=auto CARE_EXT_TAIL_HEAD=split" ;;
  esac
}
L2_VARIANTS=(${GPU_CHECK_L2:-ffma mma1 mma1t head})  # GPU_CHECK_L2: the variants, in turn
for round in $(seq 1 "${GPU_CHECK_L2_ROUNDS:-2}"); do  # GPU_CHECK_L2_ROUNDS: alternations (default 2)
  for l2 in "${L2_VARIANTS[@]}"; do
    env $(l2_env $l2) timeout "$(cap 30)" python3 "$REPO/bench/bench_ops.py" --device cuda \
      --min-time 0.2 --providers native native_graph --ops acquisition_step_fused_split2 \
      --shapes 64x8x4096 512x16x4096 256x32x4096 1024x64x4096 --out "$OUT/bench_step_ops_L2_${l2}_$round" \
      > "$OUT/bench_L2_${l2}_$round.log" 2>&1
    stamp "bench $(l2_env $l2) (round $round) exit $? : $(grep -E '^cuda' "$OUT/bench_L2_${l2}_$round.log" | tr -s ' ' | cut -d' ' -f2,4,5 | tr '\n' ';')"
  done
done
for l2 in "${L2_VARIANTS[@]}"; do
  env $(l2_env $l2) timeout "$(cap 30)" python3 "$REPO/bench/profile_step.py" --device cuda \
    --ops acquisition_step_fused_split2 --shapes 64x8x4096 256x32x4096 1024x64x4096 --out "$OUT/profile_step_L2_$l2" > "$OUT/profile_step_L2_$l2.log" 2>&1
  stamp "profile_step $(l2_env $l2) exit $? : $(grep -E 'step_tail_kernel|step_head_kernel|split_r2w|device\)' "$OUT/profile_step_L2_$l2.log" | tr -s ' ' | cut -c1-60 | tr '\n' ';')"
done
# device time per kernel of one step call (which kernel to work on next); totals into summary.txt
timeout "$(cap 45)" python3 "$REPO/bench/profile_step.py" --device cuda --shapes 64x8x4096 1024x64x4096 \
  --out "$OUT/profile_step" > "$OUT/profile_step.log" 2>&1
stamp "profile_step exit $? : $(grep -E '^acquisition_step' "$OUT/profile_step.log" | tr '\n' ';')"
# the tail's phases per stage (CARE_EXT_TAIL_STAMPS=1, default settings; the 4th call per shape)
CARE_EXT_TAIL_STAMPS=1 PYTHONPATH="$REPO/bench" timeout "$(cap 40)" python3 /tmp/stamps_step.py \
  64x8x4096 256x32x4096 1024x64x4096 > "$OUT/stamps.log" 2>&1
stamp "tail stamps exit $? (the 4th call per shape):"
grep "care_ext tail stamps" "$OUT/stamps.log" | awk 'NR % 8 == 7 || NR % 8 == 0' >> "$OUT/summary.txt"
# quick only: Nsight Compute on the tail kernel of the split2 step at 64x8x4096
# (FFMA layer 2) and 1024x64x4096 (tensor cores, pre-split operands): throughput against the SM's
# and memory's peaks, warp stalls, the instruction mix (ncu_tail_*.txt, every section's details),
# and per SASS instruction where the warps stall and what they issue (ncu_source_*_sass.csv),
# attributed to functions and source lines of this build (ncu_source_*.txt, bench/ncu_source.py:
# the kernel is built with -lineinfo), when this machine has ncu.
# The reports themselves stay in /tmp (too large to bring back).
if [ "$QUICK" = 1 ] && command -v ncu > /dev/null; then
  for shape in 1024x64x4096 64x8x4096; do
    PYTHONPATH="$REPO/bench" timeout "$(cap 60)" ncu --kernel-name regex:step_tail --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
      --section MemoryWorkloadAnalysis --section InstructionStats --section SourceCounters \
      -f -o "/tmp/ncu_tail_$shape" python3 /tmp/ncu_step.py $shape > "$OUT/ncu_tail_${shape}_run.log" 2>&1
    rc=$?
    timeout "$(cap 30)" ncu -i "/tmp/ncu_tail_$shape.ncu-rep" --print-details all > "$OUT/ncu_tail_$shape.txt" 2>&1
    timeout "$(cap 30)" ncu -i "/tmp/ncu_tail_$shape.ncu-rep" --page source --csv --print-source sass \
      > "$OUT/ncu_source_${shape}_sass.csv" 2> "$OUT/ncu_source_${shape}_sass.err"
    # per function and source line of step_tail.h (bench/ncu_source.py: the CSV joined with this
    # build's line info; 2026-11-27: 43% of the 1024x64 tail's stall samples in layer 2's HMMA loop)
    timeout "$(cap 30)" python3 "$REPO/bench/ncu_source.py" --csv "$OUT/ncu_source_${shape}_sass.csv" \
      --so "$SO" --top 30 > "$OUT/ncu_source_$shape.txt" 2>&1
    stamp "ncu step_tail $shape exit $rc : $(grep -E 'Duration|Compute \(SM\) Throughput|Memory Throughput' "$OUT/ncu_tail_$shape.txt" | tr -s ' ' | tr '\n' ';') by function: $(sed -n '3,8p' "$OUT/ncu_source_$shape.txt" | tr -s ' ' | cut -c1-60 | tr '\n' ';')"
  done
fi
stamp "compute-sanitizer (memcheck) on every kernel"
timeout "$(cap 90)" compute-sanitizer --tool memcheck --error-exitcode 9 python3 /tmp/sanitize_ops.py \
  > "$OUT/sanitizer.log" 2>&1
stamp "compute-sanitizer exit $? : $(grep -E 'ERROR SUMMARY|sanitize script ok' "$OUT/sanitizer.log" | tr '\n' ' ')"
# shared-memory races and barrier misuse in the block-cooperative kernels (the fused step's tail:
# barriers around every phase; group_features: __syncwarp between its two phases), on a small case
for tool in racecheck synccheck; do
  PYTHONPATH="$REPO/bench" timeout "$(cap 60)" compute-sanitizer --tool $tool --error-exitcode 9 \
    python3 /tmp/sanitize_sync.py > "$OUT/sanitizer_$tool.log" 2>&1
  stamp "compute-sanitizer $tool exit $? : $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|sync script ok' "$OUT/sanitizer_$tool.log" | tr '\n' ' ')"
done
# (the sync script's G = 64 runs tensor-core layer 2 with pre-split operands: auto, the default)
# the same with the tail's layer-2 weight staged in shared memory (written before the first barrier)
# and layer 2 on tensor cores splitting in its loop (staging is skipped with pre-split operands), and
# memcheck of tensor-core layer 2 (pre-split) on every shape
CARE_EXT_TAIL_L2=mma CARE_EXT_TAIL_STAGE_R2=1 CARE_EXT_TAIL_MMA_PRESPLIT=0 PYTHONPATH="$REPO/bench" timeout "$(cap 60)" compute-sanitizer --tool racecheck \
  --error-exitcode 9 python3 /tmp/sanitize_sync.py > "$OUT/sanitizer_racecheck_stage_r2.log" 2>&1
stamp "compute-sanitizer racecheck, CARE_EXT_TAIL_L2=mma CARE_EXT_TAIL_STAGE_R2=1 CARE_EXT_TAIL_MMA_PRESPLIT=0 exit $? : $(grep -E 'RACECHECK SUMMARY|sync script ok' "$OUT/sanitizer_racecheck_stage_r2.log" | tr '\n' ' ')"
CARE_EXT_TAIL_L2=mma timeout "$(cap 60)" compute-sanitizer --tool memcheck --error-exitcode 9 python3 /tmp/sanitize_ops.py \
  > "$OUT/sanitizer_mma.log" 2>&1
stamp "compute-sanitizer memcheck, CARE_EXT_TAIL_L2=mma exit $? : $(grep -E 'ERROR SUMMARY|sanitize script ok' "$OUT/sanitizer_mma.log" | tr '\n' ' ')"
CARE_EXT_TAIL_L2=mma CARE_EXT_TAIL_MMA_TILES=4x2 timeout "$(cap 60)" compute-sanitizer --tool memcheck --error-exitcode 9 \
  python3 /tmp/sanitize_ops.py > "$OUT/sanitizer_mma_tall.log" 2>&1
stamp "compute-sanitizer memcheck, CARE_EXT_TAIL_L2=mma CARE_EXT_TAIL_MMA_TILES=4x2 exit $? : $(grep -E 'ERROR SUMMARY|sanitize script ok' "$OUT/sanitizer_mma_tall.log" | tr '\n' ' ')"
# the head in a kernel of its own (CARE_EXT_TAIL_HEAD=split): memcheck on every shape, racecheck
# (its blocks' shared scratch and the last block's reads of the others' z)
CARE_EXT_TAIL_HEAD=split timeout "$(cap 60)" compute-sanitizer --tool memcheck --error-exitcode 9 \
  python3 /tmp/sanitize_ops.py > "$OUT/sanitizer_head.log" 2>&1
stamp "compute-sanitizer memcheck, CARE_EXT_TAIL_HEAD=split exit $? : $(grep -E 'ERROR SUMMARY|sanitize script ok' "$OUT/sanitizer_head.log" | tr '\n' ' ')"
CARE_EXT_TAIL_HEAD=split PYTHONPATH="$REPO/bench" timeout "$(cap 60)" compute-sanitizer --tool racecheck \
  --error-exitcode 9 python3 /tmp/sanitize_sync.py > "$OUT/sanitizer_racecheck_head.log" 2>&1
stamp "compute-sanitizer racecheck, CARE_EXT_TAIL_HEAD=split exit $? : $(grep -E 'RACECHECK SUMMARY|sync script ok' "$OUT/sanitizer_racecheck_head.log" | tr '\n' ' ')"
# the features and prompt GEMMs on a second stream (CARE_EXT_STEP_OVERLAP=1) on every shape
CARE_EXT_STEP_OVERLAP=1 timeout "$(cap 60)" compute-sanitizer --tool memcheck --error-exitcode 9 \
  python3 /tmp/sanitize_ops.py > "$OUT/sanitizer_overlap.log" 2>&1
stamp "compute-sanitizer memcheck, CARE_EXT_STEP_OVERLAP=1 exit $? : $(grep -E 'ERROR SUMMARY|sanitize script ok' "$OUT/sanitizer_overlap.log" | tr '\n' ' ')"
# quick only, last (it runs if time is left): the CARE core's decide and update on CUDA, which the
# eighth session's changes predict down (decide 512x16 30 -> 15-20 ms; update 67 -> 50-57 ms)
if [ "$QUICK" = 1 ]; then
  timeout "$(cap 45)" python3 "$REPO/bench/bench_step.py" --device cuda --steps 3 --warmup 1 \
    --out "$OUT/bench_step_quick" > "$OUT/bench_step_quick.log" 2>&1
  stamp "bench_step (quick) exit $? : $(grep -E 'decide' "$OUT/bench_step_quick.log" | tr -s ' ' | tr '\n' ';')"
  # where the update's 33-39 ms go on CUDA (ninth session; ~1700 ops per update): host ms, ops and
  # device ms per phase, scalar reads on the device, CUDA sync calls (bench/profile_update.py)
  timeout "$(cap 40)" python3 "$REPO/bench/profile_update.py" --device cuda --updates 2 \
    --shapes 64x8x4096 512x16x4096 --out "$OUT/profile_update" > "$OUT/profile_update.log" 2>&1
  stamp "profile_update exit $? : $(grep -E '^update' "$OUT/profile_update.log" | tr -s ' ' | tr '\n' ';')"
fi
# quick only, last (after ncu, if time is left): the CPU split step on pieces packed for oneDNN's
# BRGeMM against MKL's per-call packing, on this host's cores (small blocks: on the 2-core AMX VM a
# 32-row block's step took 0.75-0.87 against 1.08-1.17 ms; CareConfig.first_layer_pack="auto"
# packs only with a background update: whether "on" pays with a synchronous one on many cores is
# what this says)
if [ "$QUICK" = 1 ]; then
  timeout "$(cap 40)" python3 "$REPO/bench/bench_ops.py" --device cpu --min-time 0.2 \
    --ops acquisition_step_split acquisition_step_split_packed acquisition_step_split2_packed \
    --providers native reference \
    --shapes 64x8x4096 512x16x4096 --out "$OUT/bench_cpu_packed" > "$OUT/bench_cpu_packed.log" 2>&1
  stamp "CPU split step MKL / packed exit $? : $(grep -E '^cpu' "$OUT/bench_cpu_packed.log" | tr -s ' ' | tr '\n' ';')"
  timeout "$(cap 40)" python3 "$REPO/bench/bench_step.py" --device cpu --steps 4 --warmup 2 \
    --shapes 64x8x4096 --first-layer-gemm bf16x3 --first-layer-pack off on \
    --out "$OUT/bench_step_cpu_packed" > "$OUT/bench_step_cpu_packed.log" 2>&1
  stamp "CPU core decide, first_layer_pack off / on exit $? : $(grep -E 'decide' "$OUT/bench_step_cpu_packed.log" | tr -s ' ' | tr '\n' ';')"
  # the background update on the host's 16 cores with and without releasing the caller's idle
  # OpenMP pool first (CareConfig.background_release_threads; 2-core VM: 123-132 -> 75 ms)
  timeout "$(cap 40)" python3 "$REPO/bench/bench_step.py" --device cpu --steps 4 --warmup 2 \
    --shapes 64x8x4096 --update background-keep background sync --gap-ms 300 \
    --out "$OUT/bench_step_cpu_release" > "$OUT/bench_step_cpu_release.log" 2>&1
  stamp "CPU background update, pool kept / released / sync exit $? : $(grep -E 'decide' "$OUT/bench_step_cpu_release.log" | tr -s ' ' | tr '\n' ';')"
  # issue 7's "threads used well" for the core's default CPU path (packed bf16x3 on AMX)
  timeout "$(cap 40)" python3 "$REPO/bench/thread_scaling.py" --op acquisition_step_split_packed \
    --threads 1 2 4 8 16 --rounds 1 --min-time 0.2 --shapes 64x8x4096 \
    --out "$OUT/thread_scaling_packed" > "$OUT/thread_scaling_packed.log" 2>&1
  stamp "CPU thread scaling, packed split step exit $? : $(grep -E ' native +(1|16) ' "$OUT/thread_scaling_packed.log" | tr -s ' ' | tr '\n' ';')"
fi
[ "$QUICK" = 1 ] && { stamp "done (quick)"; exit 0; }

for fused in 0 1; do
  CARE_EXT_FUSED_STEP=$fused timeout "$(cap 60)" python3 "$REPO/bench/bench_step.py" --device cuda --steps 4 \
    --warmup 2 --out "$OUT/bench_step_fused$fused" > "$OUT/bench_step_fused$fused.log" 2>&1
  stamp "bench_step CARE_EXT_FUSED_STEP=$fused exit $? : $(grep -E 'decide' "$OUT/bench_step_fused$fused.log" | tr '\n' ' ')"
done
timeout "$(cap 60)" python3 "$REPO/bench/bench_step.py" --device cuda --steps 4 --warmup 2 \
  --first-layer-gemm bf16x3 --out "$OUT/bench_step_bf16x3" > "$OUT/bench_step_bf16x3.log" 2>&1
stamp "bench_step first_layer_gemm=bf16x3 exit $? : $(grep -E 'decide' "$OUT/bench_step_bf16x3.log" | tr '\n' ' ')"
# the update on the controller's background thread (CareConfig.background_update) with 200 ms of
# other work before the next decide: what the caller still waits for, next to the synchronous one
timeout "$(cap 60)" python3 "$REPO/bench/bench_step.py" --device cuda --steps 4 --warmup 2 \
  --shapes 64x8x4096 --update sync background --gap-ms 200 --out "$OUT/bench_step_background" \
  > "$OUT/bench_step_background.log" 2>&1
stamp "bench_step background update exit $? : $(grep -E 'decide' "$OUT/bench_step_background.log" | tr '\n' ' ')"
# the CPU controller's decide after a background update, OpenMP threads unbound and bound: on the
# 2-core VM it took 12-15 ms unbound and 8 ms with OMP_PROC_BIND=true (docs/core.md)
for bind in unset true; do
  (
    if [ "$bind" = true ]; then export OMP_PROC_BIND=true; fi
    timeout "$(cap 60)" python3 "$REPO/bench/bench_step.py" --device cpu --threads 8 --steps 6 \
      --warmup 2 --shapes 64x8x4096 --update sync background --gap-ms 300 \
      --out "$OUT/bench_step_cpu_bg_bind_$bind" > "$OUT/bench_step_cpu_bg_bind_$bind.log" 2>&1
  )
  stamp "bench_step cpu background, OMP_PROC_BIND=$bind exit $? : $(grep -E 'decide' "$OUT/bench_step_cpu_bg_bind_$bind.log" | tr '\n' ' ')"
done

stamp "benchmarks of the single ops (what time is left)"
timeout "$(cap 60)" python3 "$REPO/bench/bench_ops.py" --device cuda --min-time 0.1 \
  --ops cluster_stats group_advantage cag classwise_cag expected_cag group_features \
  --shapes 64x8x4096 1024x64x4096 --out "$OUT/bench_ops" >> "$OUT/bench.log" 2>&1
stamp "bench (ops) exit $?"
# figures of every benchmark output (bench/plot_bench.py), if this machine's Python has matplotlib;
# otherwise make them from the tarball's JSON lines afterwards
if python3 -c "import matplotlib" 2>/dev/null; then
  timeout "$(cap 30)" python3 "$REPO/bench/plot_bench.py" "$OUT"/bench_*.jsonl --out-dir "$OUT/plots" > "$OUT/plots.log" 2>&1
  stamp "plots exit $?"
fi
# the CPU step on this machine's 16 cores (the OpenMP build: does 64x8, two blocks, use the cores
# through MKL's threads; does 512x16 scale over its 32 blocks?): speedup over one thread at 1-16
# threads, next to a GEMM's on the same cores (bench/thread_scaling.py)
timeout "$(cap 90)" python3 "$REPO/bench/thread_scaling.py" --threads 1 2 4 8 16 --rounds 2 \
  --min-time 0.2 --shapes 64x8x4096 512x16x4096 --out "$OUT/thread_scaling" > "$OUT/thread_scaling.log" 2>&1
stamp "CPU thread scaling exit $? : $(grep -E ' native +(1|16) ' "$OUT/thread_scaling.log" | tr -s ' ' | tr '\n' ';')"
# the same at 64x8 with CARE_EXT_CPU_SMALL_BLOCKS=0 (two 256-row blocks on MKL's threads; the
# default 1 gives every thread a block of ceil(B / threads) prompts: 1.4-1.6 against 3.7 ms on 16
# threads on the H200 machine's host, 2026-11-27)
CARE_EXT_CPU_SMALL_BLOCKS=0 timeout "$(cap 60)" python3 "$REPO/bench/thread_scaling.py" --threads 1 4 8 16 --rounds 2 \
  --min-time 0.2 --shapes 64x8x4096 --out "$OUT/thread_scaling_big_blocks" > "$OUT/thread_scaling_big_blocks.log" 2>&1
stamp "CPU thread scaling, CARE_EXT_CPU_SMALL_BLOCKS=0 exit $? : $(grep -E ' native +(1|16) ' "$OUT/thread_scaling_big_blocks.log" | tr -s ' ' | tr '\n' ';')"
# the CPU step with float32 and with split-bf16 first layers (MKL's bf16 GEMM: AMX on recent Xeons;
# build_info's cpu_bf16_gemm) against the eager reference on all of this machine's cores
timeout "$(cap 60)" python3 "$REPO/bench/bench_ops.py" --device cpu --min-time 0.2 \
  --ops acquisition_step acquisition_step_split acquisition_step_split_packed \
  acquisition_step_split2_packed --providers native reference \
  --shapes 64x8x4096 512x16x4096 --out "$OUT/bench_cpu_split" > "$OUT/bench_cpu_split.log" 2>&1
stamp "CPU step float32 / split-bf16 exit $? : $(grep -E '^cpu' "$OUT/bench_cpu_split.log" \
  | tr -s ' ' | tr '\n' ';')"
# the CARE core's decide on the host CPU (where OpenRLHF's controller runs it) with float32 and
# split first layers side by side, and what the default 'auto' resolves to on this CPU
timeout "$(cap 60)" python3 "$REPO/bench/bench_step.py" --device cpu --threads 8 --steps 4 \
  --warmup 2 --shapes 64x8x4096 --first-layer-gemm auto float32 bf16x3 \
  --out "$OUT/bench_step_cpu_gemm" > "$OUT/bench_step_cpu_gemm.log" 2>&1
stamp "CPU core decide auto / float32 / bf16x3 exit $? : $(grep -E 'decide' \
  "$OUT/bench_step_cpu_gemm.log" | tr -s ' ' | tr '\n' ';')"
stamp "done"
