"""Issue 7's goals checked against the rows of one bench_ops.py run (JSON lines).

    python bench/step_goals.py $OUT/bench_step_ops.jsonl
    python bench/step_goals.py bench/out/bench_ops.jsonl        # a --device cpu run

For every step op measured (acquisition_step, acquisition_step_fused, acquisition_step_fused_split
with 3 bf16 pieces and _split2 with 2, and on the CPU acquisition_step_split, _split_packed,
_split2_packed and _f32_packed) it prints, per
shape, the host-inclusive native time and the goals that apply to the row's device (a row without ``device`` counts as a GPU row):
    GPU  64x8x4096      native <= 25 us, >= 70x the eager reference, >= 15x the CUDA-graph replay
    GPU  1024x64x4096   native <= 2x the memory floor (floor_us: reading the hidden states once)
    (GPU rows with native_plan_us, the step through care_ext.step_graph.StepGraph with its input
    copies, get the same goals on a second line marked "(plan)"; where the run measured the
    host's own time per call, *_host_us, the line ends with it)
    CPU  64x8x4096, 512x16x4096   native >= 5x the eager reference on the run's threads; the
                        native time over the GEMM floor (gemm_floor_us) is shown beside it
and PASS / FAIL / n/a (a number the run did not produce). Ratios come from one run on one
machine, as bench/RESULTS.md requires. Exit status 0 always: this reports, it does not gate.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

STEP_OPS = ("acquisition_step", "acquisition_step_fused", "acquisition_step_fused_split",
            "acquisition_step_fused_split2")
CPU_STEP_OPS = ("acquisition_step_split", "acquisition_step_split_packed",
                "acquisition_step_split2_packed", "acquisition_step_f32_packed")
"""Step ops with a CPU kernel only (the split-bf16 first layers on MKL's bf16 GEMM, and on pieces
packed for oneDNN's BRGeMM where the CPU has AMX; _split2_packed with 2 pieces, bf16x2; the
float32 step on weights packed once for the AVX2 GEMM, _f32_packed)."""
ALL_STEP_OPS = STEP_OPS + CPU_STEP_OPS
CPU_GOAL_SHAPES = ("64x8x4096", "512x16x4096")


def _check(value: float | None, ok) -> str:
    return "n/a" if value is None else ("PASS" if ok(value) else "FAIL")


def _ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None where the run did not produce either number."""
    return num / den if num and den else None


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def goal_lines(rows: list[dict]) -> list[str]:
    """One line per (step op, goal shape) found in ``rows`` (bench_ops.py JSON rows)."""
    out = []
    for r in rows:
        if r.get("op") not in ALL_STEP_OPS:
            continue
        nat = r.get("native_us")
        name = f"{r['op']:<29} {r['shape']:>13}  native={_num(nat, '.1f')}us"
        x_ref = _ratio(r.get("reference_us"), nat)
        if r.get("device") == "cpu":
            if r["shape"] in CPU_GOAL_SHAPES:
                k = _ratio(nat, r.get("gemm_floor_us"))
                out.append(f"{name}  threads={r.get('threads', '?')}  x{_num(x_ref, '.1f')} eager "
                           f"(>=5):{_check(x_ref, lambda v: v >= 5)}  {_num(k, '.2f')}x GEMM floor")
        else:
            out += _with_host(_gpu_goal_lines(r, name, nat, x_ref), r.get("native_host_us"))
            plan = r.get("native_plan_us")
            if plan is not None:  # the same goals through StepGraph (input copies included)
                name = f"{r['op'] + ' (plan)':<29} {r['shape']:>13}  plan={plan:.1f}us"
                out += _with_host(_gpu_goal_lines(r, name, plan,
                                                  _ratio(r.get("reference_us"), plan)),
                                  r.get("native_plan_host_us"))
    return out


def _with_host(lines: list[str], host_us: float | None) -> list[str]:
    """The goal lines with the call's host-only time (bench_ops' *_host_us: the host's own cost
    per call; the call is host-bound where it is close to the host-inclusive time)."""
    return [f"{line}  host-only={host_us:.1f}us" for line in lines] if host_us else lines


def _gpu_goal_lines(r: dict, name: str, t: float | None, x_ref: float | None) -> list[str]:
    """The GPU goal line of row ``r`` for host-inclusive time ``t`` (none off the goal shapes)."""
    if r["shape"] == "64x8x4096":
        x_graph = _ratio(r.get("cudagraph_us"), t)
        return [f"{name}  <=25us:{_check(t, lambda v: v <= 25.0)}"
                f"  x{_num(x_ref, '.1f')} eager (>=70):{_check(x_ref, lambda v: v >= 70)}"
                f"  x{_num(x_graph, '.1f')} graph (>=15):{_check(x_graph, lambda v: v >= 15)}"]
    if r["shape"] == "1024x64x4096":
        k = _ratio(t, r.get("floor_us"))
        return [f"{name}  {_num(k, '.2f')}x floor (<=2):{_check(k, lambda v: v <= 2.0)}"]
    return []


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    path = Path(args[0])
    if not path.exists():
        print(f"no bench rows at {path}")
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = goal_lines(rows)
    print("\n".join(lines) if lines else f"no step rows at the goal shapes in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
