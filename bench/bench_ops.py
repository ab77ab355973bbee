"""Microbenchmarks of the care_ext ops and the whole acquisition step.

Providers, measured side by side in one process on one machine:
    native          torch.ops.care_ext.* (the compiled kernels)
    reference       care_ext.reference, plain torch eager (the "eager" anchor of ARCHITECTURE §8)
    compile         torch.compile(reference) (after warm-up)
    cudagraph       a CUDA-graph replay of the reference (CUDA only; the launch-free floor of eager)
    native_graph    a CUDA-graph replay of the native op (CUDA only; its launch-free device time,
                    and proof that it captures: no host synchronisation inside)
    native_plan     the public step through care_ext.step_graph.StepGraph (CUDA only; opt-in):
                    host-inclusive, every call copying the inputs into the plan's buffers
    native_rowmajor the native op on the same weights stored row-major contiguous (opt-in: what
                    the CARE core's weight layout, care_ext.ops.core_step_layout, is worth)

Weights are passed in the CARE core's layout (core_step_layout: on CUDA column-major, on the CPU
at H >= 1024 both stages' first layers side by side in one buffer).

Headline numbers are host-inclusive (synchronise, N calls, synchronise; divided by N), which is what
a trainer pays at CARE's sizes. On the CPU the acquisition_step row also carries its GEMM FLOPs
(dense, as the reference computes them, and as the blocked CPU kernel does) and a FLOP floor: those
FLOPs at the measured rate of one [256, H] x [H, 128] float32 GEMM (cpu_gemm_rate) times the thread
count. Results go to --out as JSON lines and CSV with the device name, torch version and
care_ext.build_info().

    python bench/bench_ops.py --device cpu --threads 2
    python bench/bench_ops.py --device cuda --out $OUT/bench_ops
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import care_ext
from care_ext import reference as R
from care_ext.bf16_split import first_layer_split, pack_first_layer_split
from care_ext.ops import core_step_layout, pack_cpu_step_weights
import bench_args
from step_goals import ALL_STEP_OPS, CPU_STEP_OPS

CPU_ONLY_OPS = CPU_STEP_OPS + ("first_layer_split",)
"""Ops whose native kernel is CPU only (skipped on CUDA unless named with --ops)."""

SHAPES = {"cpu": ["64x8x2048", "64x8x3072", "64x8x4096", "512x16x4096"],
          "cuda": ["64x8x2048", "64x8x3072", "64x8x4096", "512x16x4096", "1024x64x4096"]}


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_inputs(B: int, G: int, H: int, device: str, hidden_dtype: torch.dtype, seed: int = 0,
                layout: str = "core"):
    """Realistic step inputs: clustered answer ids, lengths, hidden states, CARE-sized weights,
    stored as the CARE core passes them (``layout="core"``: care_ext.ops.core_step_layout -- on
    CUDA column-major, on the CPU at H >= 1024 both stages' first layers side by side) or
    row-major contiguous (``layout="row-major"``); same values either way."""
    gen = torch.Generator().manual_seed(seed)
    n = torch.randint(1, G + 1, (B, 1), generator=gen)
    ids = (torch.rand(B, G, generator=gen) * n).long()
    ids[torch.rand(B, G, generator=gen) < 0.1] = -1
    lengths = torch.randint(50, 4000, (B, G), generator=gen)
    h_p = torch.randn(B, H, generator=gen).to(hidden_dtype)
    h_r = torch.randn(B, G, H, generator=gen).to(hidden_dtype)

    def weights(Fp, Fr, C):
        shapes = [(128, H + Fp), (128,), (64, H + Fr), (64,), (512, 64), (512,), (256, 640), (256,),
                  (C, 256), (C,)]
        return [torch.randn(*s, generator=gen) / math.sqrt(s[-1] if len(s) == 2 else 1)
                for s in shapes]

    s1, s2 = weights(G + 1, 1, 2), weights(G + 1, 0, G + 1)
    split = first_layer_split(s1, s2, H)
    r = (torch.rand(B, G, generator=gen) < 0.4).float()
    r2 = (torch.rand(B, G, generator=gen) < 0.4).float()
    to = lambda t: t.to(device)  # noqa: E731
    s1, s2 = [to(t) for t in s1], [to(t) for t in s2]
    rows = (s1, s2)  # row-major, what the core splits from (ClassifierTrainer.first_layer_split)
    if layout == "core":  # the layout the CARE core passes (ClassifierTrainer.folded)
        s1, s2 = core_step_layout(s1, s2, H)
    return dict(ids=to(ids), lengths=to(lengths), h_p=to(h_p), h_r=to(h_r),
                s1=s1, s2=s2, r=to(r), r2=to(r2), rows=rows,
                split=[to(t) for t in split], split2=[to(t[:2].contiguous()) for t in split],
                packed=pack_first_layer_split(split) if device == "cpu" else None,
                packed2=(pack_first_layer_split([t[:2].contiguous() for t in split])
                         if device == "cpu" else None),
                f32_packed=(pack_cpu_step_weights(s1, s2, H) if device == "cpu" else None),
                split_out=[torch.empty_like(to(t)) for t in split],
                sizes=to(R.cluster_stats(ids)[1]), logits=to(torch.randn(B, G + 1, generator=gen)))


OP_NAMES = ("cluster_stats", "group_advantage", "cag", "classwise_cag", "expected_cag",
            "group_features", "acquisition_step", "acquisition_step_fused",
            "acquisition_step_fused_split", "acquisition_step_fused_split2",
            "acquisition_step_split", "acquisition_step_split_packed",
            "acquisition_step_split2_packed", "acquisition_step_f32_packed",
            "first_layer_split")
"""Every op bench_ops times (the keys of :func:`op_calls`, in its order)."""
PROVIDERS = ("native", "reference", "compile", "cudagraph", "native_graph", "native_plan",
             "native_rowmajor")
"""native: torch.ops.care_ext; reference: care_ext.reference eager; compile: torch.compile of the
reference; cudagraph / native_graph: CUDA-graph replays of reference / native (CUDA only), the
inputs already in the graph's buffers; native_plan: the public step through
care_ext.step_graph.StepGraph, host-inclusive, every call copying the inputs into the plan's
buffers (CUDA only; the public step ops); native_rowmajor: native on row-major contiguous
weights."""

PLAN_OPS = ("acquisition_step", "acquisition_step_fused_split", "acquisition_step_fused_split2")
"""The step ops the native_plan provider runs (the public step, and its split-bf16 first layers
with 3 and 2 pieces: what care_ext.ops.acquisition_step takes)."""


PLAN_COPY_ENV = "CARE_EXT_BENCH_PLAN_COPY"
"""How the native_plan provider's StepGraph copies each call's inputs into its buffers: ``op``
(default: care_ext.ops.copy_into, one native call and on CUDA one kernel) or ``foreach`` (torch's
_foreach_copy_, what StepGraph did before care_ext::_copy_into: one launch per tensor when the
inputs' dtypes differ), for an A/B of the two in one GPU run (bench/gpu_check.sh's
GPU_CHECK_AB)."""


def _foreach_copy_into(dst, src) -> None:
    """StepGraph's input copy before care_ext::_copy_into (the ``foreach`` setting above)."""
    pairs = [(d, s) for d, s in zip(dst, src) if d is not s]
    if pairs:
        torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])


def plan_calls(x) -> dict:
    """op -> zero-argument callable running that step op through one StepGraph per op (captured
    on its first call), with the bench's own input tensors: each call copies them into the plan's
    buffers (as PLAN_COPY_ENV says) and replays."""
    import care_ext.ops
    from care_ext.step_graph import StepGraph

    mode = os.environ.get(PLAN_COPY_ENV, "op")
    if mode not in ("op", "foreach"):
        raise SystemExit(f"{PLAN_COPY_ENV} must be 'op' or 'foreach', got {mode!r}")
    if mode == "foreach":  # for this benchmark process only
        care_ext.ops.copy_into = _foreach_copy_into

    step = (x["ids"], x["lengths"], x["h_p"], x["h_r"], x["s1"], x["s2"])
    plans = {op: StepGraph() for op in PLAN_OPS}
    pieces = {"acquisition_step": None, "acquisition_step_fused_split": x["split"],
              "acquisition_step_fused_split2": x["split2"]}
    return {op: (lambda p=plans[op], s=pieces[op]: p(*step, s)) for op in PLAN_OPS}


def op_calls(x, impl):
    """name -> zero-argument callable running that op with implementation `impl` (module-like)."""
    cag, adm = R.classwise_cag(x["sizes"], 0.0, False)
    step = (x["ids"], x["lengths"], x["h_p"], x["h_r"], x["s1"], x["s2"], 4000.0, 0.0, False, 1e-6,
            False)

    def step_call(name, *pieces):
        """The step op `name` of impl on the step's arguments (and the split pieces); impl's
        public acquisition_step where it has no such op (the reference providers: the reference
        step)."""
        op = getattr(impl, name, None)
        if op is None:
            return lambda: impl.acquisition_step(*step)
        return lambda: op(*step, *pieces)

    splitter = (torch.ops.care_ext._split_bf16 if isinstance(impl, _Native)
                else getattr(impl, "split_bf16", None))

    def first_layer_split_into():
        """What the core re-splits after every update: both stages' first layers' hidden columns,
        3 bf16 pieces, into reused buffers (native: CPU only)."""
        H = x["h_r"].shape[2]
        for k, i in enumerate((2, 0)):  # resp1_w, prompt_w
            w1, w2 = x["rows"][0][i], x["rows"][1][i]
            buf, n1 = x["split_out"][k], w1.shape[0]
            splitter(w1[:, :H], 3, buf[:, :n1])
            splitter(w2[:, :H], 3, buf[:, n1:])

    return {
        "cluster_stats": lambda: impl.cluster_stats(x["ids"]),
        "group_advantage": lambda: impl.group_advantage(x["r"], 1e-6, False),
        "cag": lambda: impl.cag(x["r"], x["r2"], 0.0, False),
        "classwise_cag": lambda: impl.classwise_cag(x["sizes"], 0.0, False),
        "expected_cag": lambda: impl.expected_cag(x["logits"], cag, adm),
        "group_features": lambda: impl.group_features(x["ids"], x["lengths"], 4000.0, 0.0, False,
                                                      1e-6, False),
        "acquisition_step": lambda: impl.acquisition_step(*step),
        # the private fused step (native only; the other providers run the reference step)
        "acquisition_step_fused": step_call("_acquisition_step_fused"),
        # the fused step on split-bf16 first layers (bf16 hidden states; native only)
        "acquisition_step_fused_split": step_call("_acquisition_step_fused_split", x["split"]),
        # the same with 2 pieces (hi, mid: weights to 2^-16; CareConfig.first_layer_gemm="bf16x2")
        "acquisition_step_fused_split2": step_call("_acquisition_step_fused_split", x["split2"]),
        # the CPU step on split-bf16 first layers (MKL's bf16 GEMM; CPU and native only)
        "acquisition_step_split": step_call("_acquisition_step_split", x["split"]),
        # the same on the pieces packed once for oneDNN's BRGeMM (AMX CPUs; CPU and native only;
        # where there is no packing it is the row above)
        "acquisition_step_split_packed": step_call("_acquisition_step_split",
                                                   x["split"] + (x["packed"] or [])),
        # the same with 2 pieces (CareConfig.first_layer_gemm="bf16x2": weights to 2^-16)
        "acquisition_step_split2_packed": step_call("_acquisition_step_split",
                                                    x["split2"] + (x["packed2"] or [])),
        # the float32 step on its weights packed once for the AVX2 GEMM (CPU and native only;
        # where the step does not run that GEMM, care_ext.ops.cpu_step_packs_weights, there is no
        # packing and it is the public step)
        "acquisition_step_f32_packed": (step_call("_acquisition_step_f32_packed", x["f32_packed"])
                                        if x.get("f32_packed") is not None
                                        else lambda: impl.acquisition_step(*step)),
        # the split pieces of both stages' first layers (care_ext::_split_bf16 vs its torch twin)
        "first_layer_split": first_layer_split_into,
    }


class _Native:
    """torch.ops.care_ext with the reference's call signature."""

    def __getattr__(self, name):
        op = getattr(torch.ops.care_ext, name)
        if name in ("acquisition_step", "_acquisition_step_fused", "_acquisition_step_fused_split",
                    "_acquisition_step_split", "_acquisition_step_f32_packed"):
            return lambda ids, l, hp, hr, s1, s2, *a: op(ids, l, hp, hr, list(s1), list(s2), *a)
        return op


class _Compiled:
    """torch.compile of each reference op, compiled on first use."""

    def __init__(self):
        self.cache = {}

    def __getattr__(self, name):
        if name not in self.cache:
            self.cache[name] = torch.compile(getattr(R, name))
        return self.cache[name]


def host_time(fn, device: str, min_time: float, enqueue: list[float] | None = None) -> list[float]:
    """Per-call host-inclusive seconds over several blocks (sync, N calls, sync). The N calls run
    back to back, so on CUDA a call costs the larger of its host work and its device work. With
    ``enqueue`` (a list), each block's per-call seconds until the last call returned, before the
    closing sync, are appended to it: the host's own cost per call, as long as the device queue
    does not fill (then it waits for the device too)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = max(time.perf_counter() - t0, 1e-7)
    n = max(1, min(2000, int(0.05 / one)))
    samples, spent = [], 0.0
    while spent < min_time or len(samples) < 5:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if enqueue is not None:
            enqueue.append((time.perf_counter() - t0) / n)
        sync()
        dt = time.perf_counter() - t0
        samples.append(dt / n)
        spent += dt
    return samples


def graph_time(fn, min_time: float, enqueue: list[float] | None = None) -> list[float]:
    """Per-call seconds of replaying fn captured in a CUDA graph (launch-free device time);
    enqueue: as host_time's (the replay's own host cost)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return host_time(g.replay, "cuda", min_time, enqueue)


def memory_floor_us(x, device: str) -> float | None:
    """Time to read the step's inputs once (a same-size device copy), the bandwidth floor."""
    if device != "cuda":
        return None
    src = torch.cat([x["h_r"].reshape(-1).view(torch.uint8), x["h_p"].reshape(-1).view(torch.uint8)])
    dst = torch.empty_like(src)
    # a copy reads and writes: half of it is the read floor
    return statistics.median(graph_time(lambda: dst.copy_(src), 0.2)) * 1e6 / 2


def step_flops(x) -> dict:
    """Multiply-add FLOPs of the acquisition step's classifier GEMMs (2 per multiply-add).

    dense: every layer over all B*G rows for both stages (the reference, and the CUDA path);
    native_cpu: Stage-II's rollout layers only over its masked rows (the valid non-majority
    rollouts), as csrc/cpu/rollout_pool.cpp computes them.
    """
    B, G, H = x["h_r"].shape
    m = int(R.group_features(x["ids"].cpu(), x["lengths"].cpu(), 4000.0, 0.0, False, 1e-6,
                             False).minority_mask.sum())
    s1, s2 = x["s1"], x["s2"]
    P, R1, R2, K = s1[0].shape[0], s1[2].shape[0], s1[4].shape[0], s1[6].shape[0]
    prompt = sum(2 * B * w[0].shape[1] * P for w in (s1, s2))
    head = sum(2 * B * ((P + R2) * K + K * w[8].shape[0]) for w in (s1, s2))
    rollout = lambda rows, Fr: 2 * rows * ((H + Fr) * R1 + R1 * R2)  # noqa: E731
    return dict(flops_dense=prompt + head + rollout(B * G, 1) + rollout(B * G, 0),
                flops_native_cpu=prompt + head + rollout(B * G, 1) + rollout(m, 0),
                minority_fraction=m / max(1, B * G))


def cpu_gemm_rate(H: int, min_time: float) -> float:
    """FLOP/s of one float32 [256, H] x [H, 128] GEMM on a row-major [H, 128] weight on this
    machine's current threads: the blocked CPU step's dominant GEMM as the CARE core's layout
    makes it (both stages' first layers side by side, care_ext.ops.shared_first_layers; the
    fastest of the GEMM layouts measured), used for its FLOP floor. (Until 2026-11-27 the floor
    used [256, H] x [H, 64] on a transposed weight, 11-17% slower on an AVX-512 Xeon.)"""
    a, w = torch.randn(256, H), torch.randn(H, 128)
    t = statistics.median(host_time(lambda: a @ w, "cpu", min_time))
    return 2 * 256 * H * 128 / t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", type=bench_args.device, default=bench_args.default_device())
    ap.add_argument("--shapes", nargs="*", type=bench_args.shape, help="BxGxH, default per device")
    ap.add_argument("--ops", nargs="*", choices=OP_NAMES, metavar="OP",
                    help="subset of ops (default: all the device has): " + ", ".join(OP_NAMES))
    ap.add_argument("--providers", nargs="*", choices=PROVIDERS,
                    default=["native", "reference", "compile", "cudagraph", "native_graph"])
    ap.add_argument("--hidden-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=bench_args.positive_int, default=None,
                    help="torch CPU threads")
    ap.add_argument("--min-time", type=bench_args.positive_float, default=0.5,
                    help="seconds per measurement")
    ap.add_argument("--out", default="bench/out/bench_ops", help="output path prefix")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not care_ext.HAS_NATIVE:
        print(f"native library not loaded: {care_ext.NATIVE_ERROR}", file=sys.stderr)
        return 2
    dev = args.device
    dev_name = torch.cuda.get_device_name() if dev == "cuda" else cpu_name()
    meta = dict(device=dev, device_name=dev_name, torch=torch.__version__,
                threads=torch.get_num_threads(), build_info=care_ext.build_info(),
                hidden_dtype=args.hidden_dtype, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                plan_copy=os.environ.get(PLAN_COPY_ENV, "op"))
    rows = []
    native, compiled = _Native(), _Compiled()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a row per line as it is measured (a timeout or a crash keeps the rows so far)
    with open(out.with_suffix(".jsonl"), "w") as jsonl:
        for shape in args.shapes or SHAPES[dev]:
            B, G, H = bench_args.dims(shape)
            x = make_inputs(B, G, H, dev, getattr(torch, args.hidden_dtype))
            floor = memory_floor_us(x, dev)
            extra = {}
            if set(ALL_STEP_OPS) & set(args.ops or ["acquisition_step"]):
                extra = step_flops(x)
                if dev == "cpu":
                    # one BLAS thread per block: the rate of all cores is threads x the 1-thread rate
                    threads = torch.get_num_threads()
                    torch.set_num_threads(1)
                    rate = cpu_gemm_rate(H, args.min_time) * threads
                    torch.set_num_threads(threads)
                    extra.update(cpu_gemm_gflops=rate / 1e9,
                                 gemm_floor_us=extra["flops_native_cpu"] / rate * 1e6)
            calls = {"native": op_calls(x, native), "reference": op_calls(x, R)}
            if "native_plan" in args.providers and dev == "cuda":
                calls["native_plan"] = plan_calls(x)
            if "native_rowmajor" in args.providers:  # the same weights, row-major contiguous
                rm = dict(x, s1=[w.contiguous() for w in x["s1"]],
                          s2=[w.contiguous() for w in x["s2"]])
                calls["native_rowmajor"] = op_calls(rm, native)
            for op in args.ops or [o for o in calls["native"]
                                   if dev == "cpu" or o not in CPU_ONLY_OPS]:
                result = dict(shape=shape, op=op, floor_us=floor,
                              **(extra if op in ALL_STEP_OPS else {}))
                for prov in args.providers:
                    enqueue: list[float] = []  # host-only seconds per call (CUDA, eager and plan)
                    try:
                        if prov in ("native", "reference", "native_rowmajor"):
                            t = host_time(calls[prov][op], dev, args.min_time,
                                          enqueue if dev == "cuda" else None)
                        elif prov == "compile":
                            t = host_time(op_calls(x, compiled)[op], dev, args.min_time)
                        elif prov == "cudagraph" and dev == "cuda":
                            t = graph_time(calls["reference"][op], args.min_time)
                        elif prov == "native_graph" and dev == "cuda":
                            t = graph_time(calls["native"][op], args.min_time, enqueue)
                        elif prov == "native_plan" and dev == "cuda" and op in PLAN_OPS:
                            t = host_time(calls["native_plan"][op], dev, args.min_time, enqueue)
                        else:
                            continue
                    except Exception as exc:  # a provider that cannot run this op is reported, not fatal
                        result[f"{prov}_error"] = f"{type(exc).__name__}: {exc}"[:200]
                        continue
                    result[f"{prov}_us"] = statistics.median(t) * 1e6
                    q = statistics.quantiles(t, n=4) if len(t) >= 4 else [min(t), max(t)]
                    result[f"{prov}_iqr_us"] = (q[-1] - q[0]) * 1e6
                    if enqueue:  # the host's share: a call is host-bound where this is ~{prov}_us
                        result[f"{prov}_host_us"] = statistics.median(enqueue) * 1e6
                if "native_us" in result and "reference_us" in result:
                    result["speedup_vs_reference"] = result["reference_us"] / result["native_us"]
                rows.append(result)
                jsonl.write(json.dumps({**meta, **result}) + "\n")
                jsonl.flush()
                cols = [f"{p}={result[p + '_us']:.1f}us" for p in args.providers if p + "_us" in result]
                hosts = [f"{p}:{result[p + '_host_us']:.1f}" for p in args.providers
                         if p + "_host_us" in result]
                print(f"{dev} {shape:>13} {op:<17} " + "  ".join(cols)
                      + (f"  x{result['speedup_vs_reference']:.1f}" if "speedup_vs_reference" in result else "")
                      + (f"  floor={floor:.1f}us" if floor else "")
                      + (f"  gemm-floor={result['gemm_floor_us']:.0f}us" if "gemm_floor_us" in result
                         else "")
                      + (f"  host-only us {' '.join(hosts)}" if hosts else ""), flush=True)
    keys = sorted({k for r in rows for k in r})
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device_name", "torch", "threads"] + keys)
        w.writeheader()
        for r in rows:
            w.writerow({"device_name": dev_name, "torch": torch.__version__,
                        "threads": meta["threads"], **r})
    print(f"wrote {out.with_suffix('.jsonl')} and .csv  ({json.dumps(meta['build_info'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
