"""How far each CPU acquisition step lands from a float64 evaluation of the same step.

    python bench/step_precision.py                       # 64x8x4096 on the CPU, bf16 states
    python bench/step_precision.py --shapes 64x8x4096 512x16x4096 --out bench/out/precision

For bf16 hidden states and the CARE-sized classifiers of bench_ops.make_inputs, it runs the eager
float32 reference, the native float32 step, and the split-bf16 steps (CareConfig.first_layer_gemm
'bf16x3' and 'bf16x2'; on packed pieces where the CPU has AMX, else MKL's path on the plain
pieces), and prints per output (reliability, logits1, probs, ecag) the largest absolute
difference from the float64 reference (care_ext.reference on float64 copies), divided by the
largest absolute float64 value. That is the number behind choosing 'bf16x2' (weights to 2^-16)
over 'bf16x3' (float32-exact weights): bench/RESULTS.md has the runs. JSON lines with --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_args  # noqa: E402  (the bench directory, put on the path above)

OUTPUTS = {2: "reliability", 3: "logits1", 4: "probs", 5: "ecag"}
"""Index in the step's output tuple -> name, for the outputs with a float value."""


def relative_errors(got, ref) -> dict[str, float]:
    """max |got - ref| / max |ref| per float output of two step tuples (ref: float64)."""
    out = {}
    for i, name in OUTPUTS.items():
        a, b = got[i].double(), ref[i].double()
        if b.numel() == 0:  # B = 0
            out[name] = 0.0
            continue
        out[name] = float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
    return out


def measure(B: int, G: int, H: int) -> list[dict]:
    """One row per step variant at B x G x H: its relative errors against float64."""
    import care_ext  # noqa: F401  (registers torch.ops.care_ext)
    from bench_ops import make_inputs
    from care_ext import reference as R

    x = make_inputs(B, G, H, "cpu", torch.bfloat16)
    rest = (4000.0, 0.0, False, 1e-6, False)
    f64 = [[t.double() for t in s] for s in (x["s1"], x["s2"])]
    ref = R.acquisition_step(x["ids"], x["lengths"], x["h_p"].double(), x["h_r"].double(), *f64,
                             *rest)
    base = (x["ids"], x["lengths"], x["h_p"], x["h_r"], list(x["s1"]), list(x["s2"])) + rest
    ops = torch.ops.care_ext
    variants = {
        "eager float32 reference": lambda: R.acquisition_step(
            x["ids"], x["lengths"], x["h_p"].float(), x["h_r"].float(), x["s1"], x["s2"], *rest),
        "native float32": lambda: ops.acquisition_step(*base),
        "native bf16x3": lambda: ops._acquisition_step_split(*base,
                                                             x["split"] + (x["packed"] or [])),
        "native bf16x2": lambda: ops._acquisition_step_split(*base,
                                                             x["split2"] + (x["packed2"] or [])),
    }
    return [dict(shape=f"{B}x{G}x{H}", variant=name, packed=x["packed"] is not None,
                 **relative_errors(fn(), ref)) for name, fn in variants.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", type=bench_args.shape, default=["64x8x4096"],
                    help="BxGxH (H even)")
    ap.add_argument("--threads", type=bench_args.positive_int, default=None,
                    help="torch CPU threads")
    ap.add_argument("--out", default=None, help="write JSON lines to OUT.jsonl")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes:
        B, G, H = bench_args.dims(shape)
        if H % 2:
            ap.error(f"H must be even (bf16 pairs of the packed pieces), got {shape!r}")
        rows += measure(B, G, H)
    print(f"{'shape':>12} {'variant':<24} " + " ".join(f"{n:>11}" for n in OUTPUTS.values()))
    for r in rows:
        print(f"{r['shape']:>12} {r['variant']:<24} "
              + " ".join(f"{r[n]:11.1e}" for n in OUTPUTS.values()))
    if args.out:
        print(f"wrote {bench_args.write_jsonl(args.out, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
