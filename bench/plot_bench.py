"""Figures of the benchmark rows: what bench/RESULTS.md's tables say, to look at.

    python bench/plot_bench.py bench/results/h200_2026-11-26b_bench_ops.jsonl
    python bench/plot_bench.py $OUT/bench_step_ops.jsonl $OUT/bench_step_fused1.jsonl --out-dir plots

Each input is the JSON lines of one run of ``bench/bench_ops.py`` or ``bench/bench_step.py`` (the
kind is told by the rows' keys) and gives one PNG, ``<out-dir>/<input stem>.png``:

* bench_ops rows: one panel per op, the shapes along x, one bar per provider (native,
  native_graph, reference, compile, cudagraph), log-scaled time in µs with the interquartile range
  as an error bar; on the step ops a black tick marks the floor (GPU: the memory floor
  ``floor_us``, reading the inputs once; CPU: the GEMM floor ``gemm_floor_us``). The title names device, torch,
  threads and date: the run that every ratio in the figure comes from.
* bench_step rows: decide and update stacked per row (shape and the options that vary between
  rows: threads, first_layer_backward, first_layer_gemm, projected), in ms, with the update's share.

A run's figure shows only what that run measured; comparing two runs means two figures (ratios
across machines or sessions are not comparable, see bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

PROVIDERS = ("native", "native_graph", "reference", "compile", "cudagraph")
"""bench_ops.py providers in the order their bars are drawn."""
STEP_OPTIONS = ("threads", "first_layer_backward", "first_layer_gemm", "projected")
"""bench_step.py row keys that tell rows of the same shape apart (shown when they vary)."""


def read_rows(path: Path) -> tuple[str, list[dict]]:
    """The rows of one benchmark output and their kind.

    Args:
        path: a JSON-lines file written by bench_ops.py or bench_step.py.

    Returns:
        ('ops' | 'step', rows): 'ops' when the rows carry ``op``, 'step' when they carry
        ``decide_ms``.

    Raises:
        FileNotFoundError: no such file. ValueError: a line that is not a JSON object (its line
        number is named), no rows at all, rows of neither or of both kinds, bench_ops-like rows
        without any provider time, a row without ``shape`` (or, for bench_step, ``update_ms``).
    """
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark rows at {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: a JSON {type(row).__name__}, not a row object")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    kinds = {"ops" if "op" in r else "step" if "decide_ms" in r else "?" for r in rows}
    if kinds not in ({"ops"}, {"step"}):
        raise ValueError(f"{path}: rows are not all bench_ops.py rows (with 'op') or all "
                         f"bench_step.py rows (with 'decide_ms'); found kinds {sorted(kinds)}")
    kind = kinds.pop()
    if kind == "ops" and not any(f"{p}_us" in r for r in rows for p in PROVIDERS):
        raise ValueError(f"{path}: no provider times ({', '.join(p + '_us' for p in PROVIDERS)}) "
                         "in any row: not a bench_ops.py output (profile_step.py rows are tables)")
    need = ("shape",) if kind == "ops" else ("shape", "update_ms")
    for n, r in enumerate(rows, 1):
        missing = [k for k in need if k not in r]
        if missing:
            raise ValueError(f"{path}: row {n} has no {', '.join(missing)}")
    return kind, rows


def _shape_key(shape: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in shape.split("x"))
    except ValueError:
        return (math.inf,)  # an odd shape name sorts last instead of failing the figure


def ops_series(rows: list[dict]) -> dict[str, dict]:
    """bench_ops rows as plotting series, per op in first-seen order.

    Returns:
        ``{op: {"shapes": [shape, ...] (ascending B, G, H), "floor": [µs or None per shape],
        "floor_kind": "GEMM floor" | "memory floor",
        "providers": {provider: ([median µs or None], [iqr µs or None])}}}``; a provider appears
        only if it measured the op at one shape at least. The floor (step ops only: bench_ops'
        ``floor_us`` is the whole step's, reading all its inputs once, so it does not bound a single
        op) is the GEMM floor where the row has one (CPU), else the memory floor; None elsewhere.
    """
    out: dict[str, dict] = {}
    by_op: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_op.setdefault(r["op"], {})[r["shape"]] = r
    for op, by_shape in by_op.items():
        shapes = sorted(by_shape, key=_shape_key)
        step = op.startswith("acquisition_step")
        floors = [(by_shape[s].get("gemm_floor_us") or by_shape[s].get("floor_us")) if step else None
                  for s in shapes]
        provs = {}
        for p in PROVIDERS:
            med = [by_shape[s].get(f"{p}_us") for s in shapes]
            if any(v is not None for v in med):
                provs[p] = (med, [by_shape[s].get(f"{p}_iqr_us") for s in shapes])
        kind = "GEMM floor" if any(by_shape[s].get("gemm_floor_us") for s in shapes) else "memory floor"
        out[op] = {"shapes": shapes, "floor": floors, "floor_kind": kind, "providers": provs}
    return out


def step_series(rows: list[dict]) -> dict[str, list]:
    """bench_step rows as stacked-bar series, in row order.

    Returns:
        ``{"labels": [...], "decide_ms": [...], "update_ms": [...]}``: a label is the shape plus
        every option of :data:`STEP_OPTIONS` whose value differs between rows (``t=`` threads).
    """
    varying = [k for k in STEP_OPTIONS if len({str(r.get(k)) for r in rows}) > 1]
    short = {"threads": "t", "first_layer_backward": "flb", "first_layer_gemm": "gemm",
             "projected": "proj"}
    labels = [" ".join([r["shape"]] + [f"{short[k]}={r.get(k)}" for k in varying]) for r in rows]
    return {"labels": labels, "decide_ms": [float(r["decide_ms"]) for r in rows],
            "update_ms": [float(r["update_ms"]) for r in rows]}


def _title(rows: list[dict], what: str) -> str:
    r = rows[0]
    bits = [what, str(r.get("device_name") or r.get("device", "?")), f"torch {r.get('torch', '?')}"]
    if r.get("threads") is not None and len({x.get("threads") for x in rows}) == 1:
        bits.append(f"threads={r['threads']}")
    if r.get("date"):
        bits.append(str(r["date"]))
    return " · ".join(bits)


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (imported when a figure is drawn)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_ops(rows: list[dict], png: Path) -> Path:
    """Draw bench_ops rows (see the module docstring) into ``png``; returns the path."""
    plt = _pyplot()
    series = ops_series(rows)
    n = len(series)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
    colors = dict(zip(PROVIDERS, ("#1f77b4", "#17becf", "#d62728", "#ff7f0e", "#9467bd")))
    for ax, (op, s) in zip(axes.flat, series.items()):
        k = len(s["providers"])
        width = 0.8 / max(k, 1)
        xs = range(len(s["shapes"]))
        for j, (p, (med, iqr)) in enumerate(s["providers"].items()):
            pos = [x - 0.4 + width * (j + 0.5) for x in xs]
            vals = [v if v is not None else float("nan") for v in med]
            err = [e if (e is not None and v is not None) else 0.0 for v, e in zip(med, iqr)]
            ax.bar(pos, vals, width, yerr=[[0.0] * len(err), err], label=p, color=colors[p],
                   capsize=2, error_kw={"elinewidth": 0.8})
        labelled = False
        for x, f in zip(xs, s["floor"]):
            if f:
                ax.hlines(f, x - 0.42, x + 0.42, colors="black", linewidth=1.5,
                          label=None if labelled else s["floor_kind"])
                labelled = True
        ax.set_yscale("log")
        ax.set_xticks(list(xs), s["shapes"], rotation=20, fontsize=8)
        ax.set_title(op, fontsize=10)
        ax.set_ylabel("µs (host-inclusive median)", fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.25)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles),
               fontsize=8, frameon=False)
    fig.suptitle(_title(rows, "bench_ops"), fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_step(rows: list[dict], png: Path) -> Path:
    """Draw bench_step rows (see the module docstring) into ``png``; returns the path."""
    plt = _pyplot()
    s = step_series(rows)
    n = len(s["labels"])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * n + 2), 4.0))
    xs = list(range(n))
    ax.bar(xs, s["decide_ms"], 0.6, label="decide", color="#1f77b4")
    ax.bar(xs, s["update_ms"], 0.6, bottom=s["decide_ms"], label="update (3 AdamW steps × 2 stages)",
           color="#ff7f0e")
    for x, d, u in zip(xs, s["decide_ms"], s["update_ms"]):
        ax.text(x, d + u, f"{u / (d + u):.0%}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, s["labels"], rotation=25, ha="right", fontsize=7)
    ax.set_ylabel("ms per RL step (median)")
    ax.legend(fontsize=8, frameon=False, title="label: update share", title_fontsize=7)
    ax.grid(axis="y", alpha=0.25)
    ax.set_title(_title(rows, "bench_step"), fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_file(path: Path, out_dir: Path | None = None) -> Path:
    """One figure for one benchmark output: ``<out_dir or its folder>/<stem>.png``."""
    kind, rows = read_rows(path)
    png = (out_dir or path.parent) / f"{path.stem}.png"
    return plot_ops(rows, png) if kind == "ops" else plot_step(rows, png)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("inputs", nargs="+", type=Path, help="JSON lines of bench_ops.py / bench_step.py")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where the PNGs go (default: next to each input)")
    args = ap.parse_args(argv)
    status = 0
    for path in args.inputs:
        try:
            print(plot_file(path, args.out_dir))
        except (OSError, ValueError, KeyError) as exc:
            print(f"plot_bench: {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
