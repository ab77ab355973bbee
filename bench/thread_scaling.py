"""How well the CPU acquisition step uses its threads: speedup over one thread, next to a GEMM's.

Issue 7 asks for the CPU step "with threads used well". A speedup alone does not say that: on a
shared VM, or where memory bandwidth or clocks do not grow with the cores, no code scales by the
thread count. So every round measures, in one process and one after the other at each thread
count, three things:
    native      torch.ops.care_ext.acquisition_step (the blocked CPU kernel; with --op one of the
                CPU split steps instead, e.g. acquisition_step_split_packed, the default path
                of the CARE core on AMX CPUs)
    reference   care_ext.reference.acquisition_step (plain torch eager)
    gemm        one float32 [2048, H] x [H, 64] product: eight of the step's Stage-I blocks as a
                single GEMM, MKL's own split over the threads. The step is GEMM-bound, so this
                is the speedup it could reach on this machine if nothing else were in its way.
Rounds alternate the thread order (1 2 4 .. then .. 4 2 1) so that a drift of the machine's speed
falls on both ends. Per shape, provider and thread count: the median time over rounds and the
speedup over one thread (median over rounds of the same round's 1-thread / t-thread time);
``vs_gemm`` is a provider's speedup divided by the GEMM's (1.0: the step scales as well as the
GEMM does here). Writes <out>.jsonl (one row each, with torch, build_info, CPU count, date) and
<out>.png (speedup against threads, one panel per shape; needs matplotlib).

    python bench/thread_scaling.py --threads 1 2 --shapes 64x8x4096 512x16x4096
    python bench/thread_scaling.py --threads 1 2 4 8 16 --out $OUT/thread_scaling   # 16 cores
    python bench/thread_scaling.py --op acquisition_step_split_packed --threads 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import bench_args
from bench_ops import _Native, cpu_name, host_time, make_inputs, op_calls
from step_goals import CPU_STEP_OPS

import care_ext
from care_ext import reference as R

PROVIDERS = ("native", "reference", "gemm")
OPS = ("acquisition_step",) + CPU_STEP_OPS
"""The step ops --op may name (bench_ops' names; the reference is always the eager step)."""


def gemm_probe(H: int):
    """A zero-argument callable: one [2048, H] x [H, 64] float32 product (see module docstring)."""
    a, w = torch.randn(2048, H), torch.randn(64, H)
    return lambda: torch.mm(a, w.t())


def measure(shapes: list[str], threads: list[int], providers: list[str], rounds: int,
            min_time: float, hidden_dtype: torch.dtype, log=print,
            op: str = "acquisition_step") -> list[dict]:
    """Times of every (shape, provider, threads) in every round, as rows
    ``{shape, provider, threads, round, ms}`` (median milliseconds of the round's calls).

    Args:
        shapes: "BxGxH" strings. threads: thread counts, 1 among them. providers: names from
        PROVIDERS. rounds: >= 1; odd rounds run the thread counts in reverse. min_time: seconds per
        measurement. hidden_dtype: the hidden states' dtype (bfloat16 as captured, or float32).
        op: the native step op (OPS); the split ones need bfloat16 hidden states.
    """
    before = torch.get_num_threads()
    rows = []
    try:
        for shape in shapes:
            B, G, H = bench_args.dims(shape)
            x = make_inputs(B, G, H, "cpu", hidden_dtype)
            calls = {"native": op_calls(x, _Native())[op],
                     "reference": op_calls(x, R)["acquisition_step"], "gemm": gemm_probe(H)}
            for rnd in range(rounds):
                for t in (threads if rnd % 2 == 0 else threads[::-1]):
                    torch.set_num_threads(t)
                    for p in providers:
                        ms = statistics.median(host_time(calls[p], "cpu", min_time)) * 1e3
                        rows.append({"shape": shape, "provider": p, "threads": t,
                                     "round": rnd, "ms": ms})
                log(f"  {shape} round {rnd + 1}/{rounds} done")
    finally:
        torch.set_num_threads(before)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per (shape, provider, threads): median ms over rounds, the speedup over one thread (median
    of per-round ratios), efficiency = speedup / threads, and vs_gemm = speedup / the GEMM's
    speedup at the same shape and thread count (absent without a gemm row)."""
    at = {(r["shape"], r["provider"], r["threads"], r["round"]): r["ms"] for r in rows}
    out = []
    for shape, p, t in sorted({(r["shape"], r["provider"], r["threads"]) for r in rows},
                              key=lambda k: (k[0], PROVIDERS.index(k[1]), k[2])):
        rnds = sorted(k[3] for k in at if k[:3] == (shape, p, t))
        ratios = [at[(shape, p, 1, k)] / at[(shape, p, t, k)] for k in rnds]
        speedup = statistics.median(ratios)
        out.append({"shape": shape, "provider": p, "threads": t,
                    "ms": statistics.median(at[(shape, p, t, k)] for k in rnds),
                    "speedup": speedup, "speedup_min": min(ratios), "speedup_max": max(ratios),
                    "efficiency": speedup / t, "rounds": len(rnds)})
    gemm = {(s["shape"], s["threads"]): s["speedup"] for s in out if s["provider"] == "gemm"}
    for s in out:
        if (s["shape"], s["threads"]) in gemm:
            s["vs_gemm"] = s["speedup"] / gemm[(s["shape"], s["threads"])]
    return out


def plot(summary: list[dict], meta: dict, path: Path) -> bool:
    """Speedup against threads, one panel per shape, the ideal as a dashed line; False (and no
    file) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shapes = sorted({s["shape"] for s in summary})
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 3.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sel = [s for s in summary if s["shape"] == shape]
        ts = sorted({s["threads"] for s in sel})
        ax.plot(ts, ts, "k--", lw=1, label="ideal")
        for p in PROVIDERS:
            pts = sorted((s["threads"], s["speedup"], s["speedup_min"], s["speedup_max"])
                         for s in sel if s["provider"] == p)
            if pts:
                t, y, lo, hi = zip(*pts)
                err = [[a - b for a, b in zip(y, lo)], [b - a for a, b in zip(y, hi)]]
                ax.errorbar(t, y, yerr=err, marker="o", capsize=3, label=p)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ts, [str(t) for t in ts])
        ax.set_xlabel("threads")
        ax.set_ylabel("speedup over 1 thread")
        ax.set_title(shape)
        ax.legend(fontsize=8)
    fig.suptitle(f"CPU {meta.get('op', 'acquisition_step')}, thread scaling: "
                 f"{meta['device_name']}, {meta['cpu_count']} CPUs, torch {meta['torch']}, "
                 f"{meta['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=bench_args.positive_int, nargs="+", default=[1, 2],
                    help="thread counts (1 is added if missing: speedups are over one thread)")
    ap.add_argument("--shapes", nargs="+", type=bench_args.shape,
                    default=["64x8x4096", "512x16x4096"], help="BxGxH")
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--rounds", type=bench_args.positive_int, default=3)
    ap.add_argument("--min-time", type=bench_args.positive_float, default=0.5,
                    help="seconds per measurement")
    ap.add_argument("--hidden-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--op", default="acquisition_step", choices=OPS,
                    help="the native step timed (default: the public float32 step)")
    ap.add_argument("--out", default="bench/out/thread_scaling", help="output path prefix")
    args = ap.parse_args(argv)
    if args.op != "acquisition_step" and args.hidden_dtype != "bfloat16":
        ap.error(f"--op {args.op} multiplies bf16 pieces: it needs --hidden-dtype bfloat16")
    if "native" in args.providers and not care_ext.HAS_NATIVE:
        print(f"native library not loaded: {care_ext.NATIVE_ERROR}", file=sys.stderr)
        return 2
    threads = sorted(set(args.threads) | {1})
    # the CPUs this process may run on (a container's affinity), else the machine's
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if max(threads) > cpus:
        print(f"warning: {max(threads)} threads on {cpus} CPUs: oversubscribed", file=sys.stderr)
    meta = {"device": "cpu", "device_name": cpu_name(),
            "cpu_count": cpus, "torch": torch.__version__, "build_info": care_ext.build_info(),
            "hidden_dtype": args.hidden_dtype, "op": args.op,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"thread scaling of {args.op} on {cpus} CPUs, threads {threads}, {args.rounds} rounds")
    rows = measure(args.shapes, threads, args.providers, args.rounds, args.min_time,
                   getattr(torch, args.hidden_dtype), op=args.op)
    summary = summarise(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".jsonl"), "w") as f:
        f.writelines(json.dumps({"kind": "sample", **r, **meta}) + "\n" for r in rows)
        f.writelines(json.dumps({"kind": "summary", **s, **meta}) + "\n" for s in summary)
    print(f"{'shape':>13} {'provider':>9} {'threads':>7} {'ms':>9} {'speedup':>8} "
          f"{'(range)':>13} {'eff':>5} {'vs gemm':>7}")
    for s in summary:
        vs = f"{s['vs_gemm']:.2f}" if "vs_gemm" in s else "-"
        print(f"{s['shape']:>13} {s['provider']:>9} {s['threads']:>7} {s['ms']:>9.2f} "
              f"{s['speedup']:>8.2f} {s['speedup_min']:>6.2f}-{s['speedup_max']:<6.2f} "
              f"{s['efficiency']:>5.2f} {vs:>7}")
    drew = plot(summary, meta, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.jsonl')}" + (f" and {out.with_suffix('.png')}" if drew else
                                                   " (no plot: matplotlib missing)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
