"""The classifier update's fused first layers on the CPU: care_ext's ops against their ATen twins.

    python bench/bench_bn_linear.py --threads 2
    python bench/bench_bn_linear.py --threads 2 --update 64x8x4096 512x16x4096 --pairs 12

``care_ext::_bn_linear_forward`` / ``_bn_linear_backward`` (the 'fused' first layers of
``care_ext.bn_linear``) run on care_ext's AVX2 GEMM where the CPU step does
(``care_ext.ops.cpu_step_packs_weights``); their twins are the ATen calls of
``care_ext.reference.bn_linear_forward`` / ``bn_linear_backward``. Two measurements, each side by
side in one process:

* ``--layers`` (N x O x block widths; default: the first layers of the CARE core's update at
  64x8x4096 and 512x16x4096): the op and its twin alternated, ``--rounds`` rounds of
  ``--calls`` calls each, medians;
* ``--update`` (BxGxH shapes, optional): one CARE controller whose updates alternate between
  ``care_ext.ops`` calling the ops and calling the twins (``--pairs`` pairs after ``--warmup``
  decide + update steps), medians of the updates' wall times.

Rows go to ``--out`` (JSON lines) with the torch version, the thread count and
``build_info()["cpu_f32_gemm"]``. Ratios < 1: the op is faster.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import bench_args
import torch

import care_ext
from care_ext import ops
from care_ext import reference as R

LAYERS = ("232x64x4096+1", "29x128x4096+9", "102x64x4096", "1904x64x4096+1", "119x128x4096+17",
          "850x64x4096")
"""Stage-I rollouts, a prompt layer and Stage-II rollouts of the update at 64x8x4096 (13 bought
prompts + 16 replay), then at 512x16x4096: N x O x the widths of its blocks."""


def layer(text: str) -> tuple[int, int, list[int]]:
    """``NxOxD0+D1+...``: rows, output units and block widths (all positive; N may be 0)."""
    try:
        n, o, ws = text.split("x")
        widths = [int(w) for w in ws.split("+")]
        n, o = int(n), int(o)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NxOxD0+D1+... (e.g. 232x64x4096+1)") from None
    if n < 0 or o <= 0 or any(w <= 0 for w in widths):
        raise argparse.ArgumentTypeError(f"{text!r}: O and the widths must be positive, N >= 0")
    return n, o, widths


def _time_round_us(fn, calls: int, rounds: list[float]) -> None:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    rounds.append((time.perf_counter() - t) / calls * 1e6)


def bench_layer(n: int, o: int, widths: list[int], rounds: int, calls: int) -> dict:
    g = torch.Generator().manual_seed(0)
    d = sum(widths)
    xhat = [torch.randn(n, w, generator=g) for w in widths]
    w, b = torch.randn(o, d, generator=g) / d ** 0.5, torch.randn(o, generator=g)
    gamma, beta = torch.rand(d, generator=g) + 0.5, torch.randn(d, generator=g)
    grad = torch.randn(n, o, generator=g)
    fwd, bwd = torch.ops.care_ext._bn_linear_forward, torch.ops.care_ext._bn_linear_backward
    fns = {"forward_op": lambda: fwd(xhat, w, b, gamma, beta),
           "forward_twin": lambda: R.bn_linear_forward(xhat, w, b, gamma, beta),
           "backward_op": lambda: bwd(grad, xhat, w, gamma, beta),
           "backward_twin": lambda: R.bn_linear_backward(grad, xhat, w, gamma, beta)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        _time_round_us(fn, max(1, calls // 4), [])  # warm
    for _ in range(rounds):
        for k, fn in fns.items():
            _time_round_us(fn, calls, times[k])
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"kind": "layer", "layer": f"{n}x{o}x" + "+".join(map(str, widths)),
            **{f"{k}_us": round(v, 1) for k, v in med.items()},
            "forward_ratio": round(med["forward_op"] / med["forward_twin"], 3),
            "backward_ratio": round(med["backward_op"] / med["backward_twin"], 3)}


def bench_update(shape: str, pairs: int, warmup: int) -> dict:
    from bench_step import batch
    from profile_update import _controller

    B, G, H = bench_args.dims(shape)
    ctl, gold = _controller("cpu", G)
    gen = torch.Generator().manual_seed(0)
    native = ops._cpu_native
    times: dict[str, list[float]] = {"op": [], "twin": []}
    try:
        for step in range(warmup + 2 * pairs):
            side = "op" if step % 2 == 0 else "twin"
            ops._cpu_native = native if side == "op" else (lambda t: False)
            uids, ids, gold_ids, lengths, h_p, h_r = batch(step, B, G, H, gen, "cpu")
            gold.update({u: int(x) for u, x in zip(uids, gold_ids)})
            ctl.decide(uids, ids, lengths=lengths, h_prompt=h_p, h_resp=h_r)
            t = time.perf_counter()
            ctl.update()
            if step >= warmup:
                times[side].append((time.perf_counter() - t) * 1e3)
    finally:
        ops._cpu_native = native
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"kind": "update", "shape": shape, "update_op_ms": round(med["op"], 2),
            "update_twin_ms": round(med["twin"], 2), "ratio": round(med["op"] / med["twin"], 3),
            "pairs": pairs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", nargs="*", type=layer, default=[layer(t) for t in LAYERS])
    ap.add_argument("--update", nargs="*", type=bench_args.shape, default=[],
                    help="CARE core shapes BxGxH whose update to time with the ops and the twins")
    ap.add_argument("--threads", type=bench_args.positive_int, default=None)
    ap.add_argument("--rounds", type=bench_args.positive_int, default=7)
    ap.add_argument("--calls", type=bench_args.positive_int, default=40)
    ap.add_argument("--pairs", type=bench_args.positive_int, default=12)
    ap.add_argument("--warmup", type=bench_args.non_negative_int, default=4)
    ap.add_argument("--out", default="bench/out/bench_bn_linear.jsonl")
    args = ap.parse_args(argv)
    if not care_ext.HAS_NATIVE:
        print("bench_bn_linear: the native library is not loaded; nothing to compare",
              file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_f32_gemm": care_ext.build_info().get("cpu_f32_gemm")}
    rows = [bench_layer(n, o, ws, args.rounds, args.calls) for n, o, ws in args.layers]
    rows += [bench_update(s, args.pairs, args.warmup) for s in args.update]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for r in rows:
            f.write(json.dumps({**meta, **r}) + "\n")
            if r["kind"] == "layer":
                print(f"{r['layer']:>18}: forward {r['forward_op_us']:9.1f} / "
                      f"{r['forward_twin_us']:9.1f} us ({r['forward_ratio']:.2f}), backward "
                      f"{r['backward_op_us']:9.1f} / {r['backward_twin_us']:9.1f} us "
                      f"({r['backward_ratio']:.2f})")
            else:
                print(f"update {r['shape']}: {r['update_op_ms']:.1f} ms with the ops, "
                      f"{r['update_twin_ms']:.1f} ms with the twins ({r['ratio']:.3f}, "
                      f"{r['pairs']} pairs)")
    print(f"wrote {out} ({meta['threads']} threads, cpu_f32_gemm {meta['cpu_f32_gemm']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
