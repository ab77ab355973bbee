"""Where the fused step's time goes: host and device time per op and kernel, from torch.profiler.

    python bench/profile_step.py --device cuda --shapes 64x8x4096 1024x64x4096 --out $OUT/profile_step
    python bench/profile_step.py --device cpu --shapes 64x8x256

For each shape and op (``acquisition_step``: the public composite; ``acquisition_step_fused``: the
private fused op, float32 first layers; ``acquisition_step_fused_split``: its split-bf16 GEMMs) it
profiles ``--calls`` calls after a warm-up, on the inputs bench_ops.py builds (column-major
weights on CUDA, as the CARE core passes them), and reports, sorted by time per step call, the
host side (self CPU time of every dispatched op: the custom op, ATen ops, allocations) and on CUDA
the device side (every kernel, memcpy and memset), with totals and shares. bench_ops.py says how
fast the step is; this says which kernel to work on next. Rows go to ``--out`` as JSON lines (one
per shape, op, side and kernel) and a text table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import bench_args
import care_ext
from bench_ops import make_inputs, op_calls
from step_goals import ALL_STEP_OPS, STEP_OPS


def kernel_times(fn, device: str, calls: int) -> dict[str, list[tuple[str, int, float]]]:
    """What ``fn`` costs per call, by side: ``{"host": rows, "device": rows}`` (``device`` only on
    CUDA), each row (name, calls per step call, µs per step call), largest first.

    host: the self CPU time of every op the call dispatches (the custom op itself, ATen ops,
    allocations), which bounds the host-inclusive time at CARE's small sizes; device: the device
    time of every CUDA kernel, memcpy and memset.
    """
    for _ in range(3):
        fn()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    out: dict[str, list] = {"host": []}
    if device == "cuda":
        out["device"] = []
    for e in prof.key_averages():
        on_device = e.device_type == torch.autograd.DeviceType.CUDA
        if on_device and device == "cuda":
            out["device"].append((e.key, round(e.count / calls), e.self_device_time_total / calls))
        elif not on_device:
            out["host"].append((e.key, round(e.count / calls), e.self_cpu_time_total / calls))
    return {side: sorted([r for r in rows if r[2] > 0], key=lambda r: -r[2])
            for side, rows in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", type=bench_args.device, default=bench_args.default_device())
    ap.add_argument("--shapes", nargs="*", type=bench_args.shape,
                    default=["64x8x4096", "1024x64x4096"])
    ap.add_argument("--ops", nargs="*", choices=ALL_STEP_OPS,
                    help="default: every step op the device has (the CPU-only ones on the CPU)")
    ap.add_argument("--calls", type=bench_args.positive_int, default=20,
                    help="profiled calls per shape and op")
    ap.add_argument("--out", default="bench/out/profile_step", help="output path prefix")
    args = ap.parse_args(argv)
    if not care_ext.HAS_NATIVE:
        print(f"native library not loaded: {care_ext.NATIVE_ERROR}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    if not args.ops:
        args.ops = list(STEP_OPS if args.device == "cuda" else ALL_STEP_OPS)
    native = torch.ops.care_ext
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    with open(out.with_suffix(".jsonl"), "w") as jsonl:
        for shape in args.shapes:
            B, G, H = bench_args.dims(shape)
            x = make_inputs(B, G, H, args.device, torch.bfloat16)
            calls = op_calls(x, native)
            for op in args.ops:
                for side, rows in kernel_times(calls[op], args.device, args.calls).items():
                    total = sum(r[2] for r in rows)
                    what = "kernels" if side == "device" else "op calls"
                    lines.append(f"{op} {shape} ({args.device}, {side}): {total:.1f} us per call in "
                                 f"{sum(r[1] for r in rows)} {what}")
                    for name, n, us in rows[:12]:
                        lines.append(f"  {us:9.1f} us {us / max(total, 1e-12):6.1%}  x{n:<3d} {name[:90]}")
                    for name, n, us in rows:
                        jsonl.write(json.dumps(dict(device=args.device, shape=shape, op=op, side=side,
                                                    kernel=name, calls=n, us=us, total_us=total,
                                                    torch=torch.__version__)) + "\n")
    text = "\n".join(lines)
    out.with_suffix(".txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
