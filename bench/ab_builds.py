"""Two builds of care_ext side by side on one CPU machine: which one is faster, and by how much.

On a shared machine (this project's 2-core CPU: other tenants move a GEMM's rate by up to ±25%
from one minute to the next, see bench/RESULTS.md) two benchmark runs minutes apart do not compare.
This script alternates processes of build A and build B, A B B A A B ..., and in every process
times the op interleaved with a fixed float32 GEMM (eight [256, 4096] x [4096, 64] products, the
shape of the CPU step's blocks), so each sample is the op's time as a multiple of the machine's
speed at that moment. Per shape and thread count it prints each build's median ratio over its
rounds and B / A with the paired rounds' range.

    # A: an in-place build of the base commit; B: the installed package (the working tree)
    git worktree add /tmp/base HEAD~1
    (cd /tmp/base && python setup.py build_ext --inplace)
    python bench/ab_builds.py --a /tmp/base --b installed --threads 1 2 \\
        --shapes 64x8x4096 512x16x4096 --rounds 4 --out bench/results/ab

Two settings of one build compare the same way: ``--env-a``/``--env-b`` put environment
variables into the processes of A or B, e.g. the float32 GEMM of the CPU step:

    python bench/ab_builds.py --a installed --b installed --env-a CARE_EXT_CPU_GEMM=mkl \\
        --env-b CARE_EXT_CPU_GEMM=avx2 --threads 1 2 --shapes 64x8x4096 512x16x4096

A build is ``installed`` (whatever ``import care_ext`` finds outside the source tree) or a
directory holding an in-place build (``care_ext/_C*.so``), which goes first on PYTHONPATH; the
child checks that the care_ext it imported is the one asked for and native. CPU only: on a GPU
two runs on one warm machine compare directly (bench_ops.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_args

BENCH = Path(__file__).resolve().parent


def child(args) -> int:
    """One process of one build: JSON lines {shape, threads, ratios, wall_ms, git} on stdout."""
    import torch

    (threads,) = args.threads
    torch.set_num_threads(threads)
    sys.path.insert(0, str(BENCH))
    from bench_ops import _Native, make_inputs, op_calls

    import care_ext

    info = care_ext.build_info()
    where = Path(care_ext.__file__).resolve().parent
    if not info.get("native"):
        raise SystemExit(f"ab_builds: care_ext at {where} has no native library: {info}")
    if args.build != "installed" and Path(args.build).resolve() not in where.parents:
        raise SystemExit(f"ab_builds: asked for the build in {args.build}, imported {where}")

    a = torch.randn(256, 4096)
    w = torch.randn(64, 4096).t()
    b = torch.zeros(64)

    def gemm():
        for _ in range(8):
            b.addmm(a, w)

    for shape in args.shapes:
        B, G, H = bench_args.dims(shape)
        x = make_inputs(B, G, H, "cpu", torch.bfloat16)
        fn = op_calls(x, _Native())[args.op]
        fn()
        gemm()
        ratios, walls = [], []
        deadline = time.perf_counter() + args.min_time
        while len(ratios) < 3 or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            gemm()
            t2 = time.perf_counter()
            ratios.append((t1 - t0) / (t2 - t1))
            walls.append((t1 - t0) * 1e3)
        row = {"shape": shape, "threads": threads, "op": args.op, "git": info.get("git"),
               "ratio": statistics.median(ratios), "wall_ms": statistics.median(walls),
               "samples": len(ratios)}
        print(json.dumps(row), flush=True)
    return 0


def env_pairs(items: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict; a malformed item stops the run, named."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"ab_builds: expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def run_build(build: str, threads: int, args, extra_env: dict[str, str] | None = None
              ) -> list[dict]:
    """The rows of one child process of `build` (see module docstring) at `threads`, with
    `extra_env` added to its environment."""
    env = dict(os.environ, **(extra_env or {}))
    if build != "installed":
        rest = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
        env["PYTHONPATH"] = os.pathsep.join([str(Path(build).resolve()), *rest])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", build, "--threads",
           str(threads), "--op", args.op, "--min-time", str(args.min_time),
           "--shapes", *args.shapes]
    with tempfile.TemporaryDirectory() as cwd:  # away from any source tree that would shadow
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"ab_builds: build {build!r} failed (rc {p.returncode}):\n"
                         f"{p.stderr[-2000:]}")
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def summarise(rows: list[dict]) -> list[dict]:
    """Per (shape, threads): each build's median ratio over its rounds, B / A of those medians and
    the smallest and largest B / A of one round's pair."""
    out = []
    keys = sorted({(r["shape"], r["threads"]) for r in rows}, key=lambda k: (k[1], k[0]))
    for shape, threads in keys:
        sel = [r for r in rows if r["shape"] == shape and r["threads"] == threads]
        by = {v: {r["round"]: r["ratio"] for r in sel if r["build"] == v} for v in ("a", "b")}
        med = {v: statistics.median(by[v].values()) for v in ("a", "b")}
        paired = [by["b"][k] / by["a"][k] for k in by["a"] if k in by["b"]]
        out.append({"shape": shape, "threads": threads, "a": med["a"], "b": med["b"],
                    "b_over_a": med["b"] / med["a"], "paired_min": min(paired),
                    "paired_max": max(paired), "rounds": len(paired)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", help="build A: 'installed' or a directory with an in-place build")
    ap.add_argument("--b", help="build B: 'installed' or a directory with an in-place build")
    ap.add_argument("--threads", type=bench_args.positive_int, nargs="+", default=[1])
    ap.add_argument("--shapes", type=bench_args.shape, nargs="+", default=["64x8x4096"])
    ap.add_argument("--op", default="acquisition_step", help="an op name of bench_ops.py")
    ap.add_argument("--rounds", type=bench_args.positive_int, default=4,
                    help="processes per build and thread count")
    ap.add_argument("--min-time", type=bench_args.positive_float, default=1.0,
                    help="seconds per shape and process")
    ap.add_argument("--out",
                    help="output prefix: <out>.jsonl (every process's rows, then the summaries)")
    ap.add_argument("--env-a", nargs="*", metavar="KEY=VALUE",
                    help="environment variables for build A's processes")
    ap.add_argument("--env-b", nargs="*", metavar="KEY=VALUE",
                    help="environment variables for build B's processes")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        args.build = args.child
        return child(args)
    if not args.a or not args.b:
        ap.error("--a and --b are required")
    for build in (args.a, args.b):
        if build != "installed" and not list(Path(build).glob("care_ext/_C*.so")):
            ap.error(f"{build} has no in-place build (care_ext/_C*.so); "
                     "run `python setup.py build_ext --inplace` there, or pass 'installed'")
    envs = {"a": env_pairs(args.env_a), "b": env_pairs(args.env_b)}
    rows = []
    for rnd in range(args.rounds):
        order = ("a", "b") if rnd % 2 == 0 else ("b", "a")  # A B, B A, ...: drift cancels
        for v in order:
            for threads in args.threads:
                for r in run_build(getattr(args, v), threads, args, envs[v]):
                    rows.append(dict(r, build=v, round=rnd))
                    print(f"round {rnd} {v} t{threads} {r['shape']:>12} {r['op']} "
                          f"{r['wall_ms']:9.2f} ms  {r['ratio']:7.3f} x gemm8  (git {r['git']})",
                          flush=True)
    summary = summarise(rows)
    for s in summary:
        print(f"t{s['threads']} {s['shape']:>12}  A {s['a']:.3f}  B {s['b']:.3f}  "
              f"B/A {s['b_over_a']:.3f} (rounds {s['paired_min']:.3f}..{s['paired_max']:.3f}, "
              f"n={s['rounds']})")
    if args.out:
        path = Path(args.out).with_suffix(".jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for r in rows:
                f.write(json.dumps(dict(r, a_build=args.a, b_build=args.b, a_env=envs["a"],
                                        b_env=envs["b"])) + "\n")
            for s in summary:
                f.write(json.dumps(dict(s, kind="summary", a_build=args.a, b_build=args.b,
                                        a_env=envs["a"], b_env=envs["b"])) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
