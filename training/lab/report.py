"""Results of a preset: a markdown table, CSV/JSON of every logged step and evaluation, PNG plots."""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PSEUDO_WINDOW = 20
"""Steps averaged for the "pseudo-label accuracy, first N -> last N steps" column."""
SMOOTH = 10
"""Moving-average window of the per-step curves in the plots."""


def load_runs(out_dir: Path | str) -> list[dict]:
    """Every finished run under ``out_dir``: result.json plus its steps (list of per-step dicts)."""
    runs = []
    for res in sorted(Path(out_dir).glob("runs/*/result.json")):
        r = json.loads(res.read_text())
        r["steps"] = [json.loads(line) for line in (res.parent / "steps.jsonl").read_text().splitlines()
                      if line.strip()]
        runs.append(r)
    return runs


def group_key(run: dict) -> str:
    """Row label of a run: the method, plus the budget for strategies that buy a subset."""
    spec = run["spec"]
    key = spec["method"] if not run.get("budgeted", True) else f"{spec['method']} @{round(spec['budget'] * 100)}%"
    extra = " ".join(f"{k}={v}" for k, v in spec.get("care", []))
    return f"{key} [{extra}]" if extra else key


def run_summary(run: dict) -> dict:
    """Scalar summary of one run (the table's columns)."""
    ev, steps = run["evals"], run["steps"]
    best = max(ev, key=lambda e: e["mean8"])
    ps = [s["pseudo_acc"] for s in steps]
    return {"seed": run["spec"]["seed"], "start": ev[0]["mean8"], "final": ev[-1]["mean8"],
            "best": best["mean8"], "best_step": best["step"],
            "avg": mean(e["mean8"] for e in ev[1:]) if len(ev) > 1 else ev[0]["mean8"],
            "greedy": ev[-1]["greedy"], "maj8": ev[-1]["maj8"],
            "pseudo_first": mean(ps[:PSEUDO_WINDOW]) if ps else math.nan,
            "pseudo_last": mean(ps[-PSEUDO_WINDOW:]) if ps else math.nan,
            "labels": run["labels_total"], "wall_s": run["wall_s"]}


def _fmt(x: float, nd: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def results_table(runs: list[dict], order: list[str] | None = None) -> str:
    """Markdown: one row per method (mean over seeds, ± population std of final, per-seed finals),
    then one row per run."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        groups[group_key(r)].append(run_summary(r))
    keys = sorted(groups, key=lambda k: (order.index(k.split(" @")[0]) if order and k.split(" @")[0] in order
                                        else 999, k))
    head = ("| method | seeds | start mean@8 | final mean@8 (± std) | best mean@8 | mean@8 averaged over "
            "evals after 0 | final greedy | final maj@8 | pseudo-label acc first→last 20 | labels bought | "
            "wall s | final per seed |")
    lines = ["### Mean over seeds", "", head, "|" + "---|" * 12]
    for k in keys:
        rows = sorted(groups[k], key=lambda s: s["seed"])
        m = {c: mean(s[c] for s in rows) for c in rows[0] if c != "seed"}
        sd = pstdev([s["final"] for s in rows]) if len(rows) > 1 else 0.0
        per_seed = " / ".join(_fmt(s["final"]) for s in rows)
        lines.append(f"| {k} | {len(rows)} | {_fmt(m['start'])} | {_fmt(m['final'])} ± {_fmt(sd)} | "
                     f"{_fmt(m['best'])} | {_fmt(m['avg'])} | {_fmt(m['greedy'])} | {_fmt(m['maj8'])} | "
                     f"{_fmt(m['pseudo_first'], 2)} → {_fmt(m['pseudo_last'], 2)} | {m['labels']:.0f} | "
                     f"{m['wall_s']:.0f} | {per_seed} |")
    lines += ["", "### Per run", "",
              "| method | seed | start | final | best (step) | avg over evals | greedy | maj@8 | pseudo first→last | labels | wall s |",
              "|" + "---|" * 11]
    for k in keys:
        for s in sorted(groups[k], key=lambda s: s["seed"]):
            lines.append(f"| {k} | {s['seed']} | {_fmt(s['start'])} | {_fmt(s['final'])} | "
                         f"{_fmt(s['best'])} ({s['best_step']}) | {_fmt(s['avg'])} | {_fmt(s['greedy'])} | {_fmt(s['maj8'])} | "
                         f"{_fmt(s['pseudo_first'], 2)} → {_fmt(s['pseudo_last'], 2)} | {s['labels']} | "
                         f"{s['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


CLASSIFIER_COLUMNS = (("stage1_auc", "Stage-I AUC"), ("sim/trust_precision", "trusted: majority right"),
                      ("sim/cag_recall", "bought ∩ Oracle top-k / k"),
                      ("sim/bought_wrong_majority", "bought: majority wrong"))
"""Per-step columns summarised by :func:`classifier_table` (all simulation-only monitors)."""


def classifier_table(runs: list[dict], windows: int = 4) -> str:
    """Markdown: for every strategy that buys a subset, the mean of each CLASSIFIER_COLUMNS metric
    over ``windows`` equal step windows (mean over seeds of the per-run window means; NaN steps,
    e.g. an AUC when every majority is right, are skipped)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        if r.get("budgeted", True):
            groups[group_key(r)].append(r)
    if not groups:
        return ""
    n_steps = max(len(r["steps"]) for rs in groups.values() for r in rs)
    edges = [round(i * n_steps / windows) for i in range(windows + 1)]
    head = "| method | metric | " + " | ".join(f"steps {edges[i] + 1}–{edges[i + 1]}" for i in range(windows)) + " |"
    lines = ["### Selection quality over time (simulation-only monitors)", "", head,
             "|" + "---|" * (windows + 2)]
    for k in sorted(groups):
        for col, label in CLASSIFIER_COLUMNS:
            cells, any_val = [], False
            for i in range(windows):
                per_run = []
                for r in groups[k]:
                    vals = [s.get(col) for s in r["steps"][edges[i]:edges[i + 1]]]
                    vals = [v for v in vals if v is not None and not math.isnan(v)]
                    if vals:
                        per_run.append(mean(vals))
                any_val |= bool(per_run)
                cells.append(_fmt(mean(per_run), 2) if per_run else "–")
            if any_val:
                lines.append(f"| {k} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(runs: list[dict], out_dir: Path | str) -> dict[str, Path]:
    """Write steps.csv (every logged step), evals.csv, all_runs.json; returns their paths."""
    out = Path(out_dir)
    paths = {"steps": out / "steps.csv", "evals": out / "evals.csv", "json": out / "all_runs.json"}
    for name, field in (("steps", "steps"), ("evals", "evals")):
        rows = []
        for r in runs:
            for rec in r[field]:
                rows.append({"method": r["spec"]["method"], "budget": r["spec"]["budget"],
                             "seed": r["spec"]["seed"], **rec})
        cols = sorted({c for row in rows for c in row}, key=lambda c: (c not in ("method", "budget", "seed", "step"), c))
        with open(paths[name], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    paths["json"].write_text(json.dumps(runs))
    return paths


def _smooth(xs: list[float], w: int) -> list[float]:
    out, acc = [], []
    for x in xs:
        acc = (acc + [x])[-w:]
        vals = [a for a in acc if a is not None and not (isinstance(a, float) and math.isnan(a))]
        out.append(mean(vals) if vals else math.nan)
    return out


def _band_plot(ax, groups: dict[str, list[tuple[list, list]]], ylabel: str, title: str) -> None:
    for i, (k, series) in enumerate(sorted(groups.items())):
        xs = series[0][0]
        n = min(len(s[1]) for s in series)
        ys = [[s[1][j] for s in series] for j in range(n)]
        mid = [mean(v) for v in ys]
        color = f"C{i % 10}"
        style = ("-", "--", "-.", ":")[(i // 2) % 4]  # overlapping curves stay distinguishable
        ax.plot(xs[:n], mid, label=f"{k} (n={len(series)})", color=color, lw=1.6, ls=style)
        if len(series) > 1:
            ax.fill_between(xs[:n], [min(v) for v in ys], [max(v) for v in ys], color=color, alpha=0.15)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def write_plots(runs: list[dict], out_dir: Path | str) -> list[Path]:
    """PNG plots (lines = mean over seeds, bands = min..max over seeds):
    accuracy.png (held-out mean@8 and greedy vs step), pseudo_label.png (batch pseudo-label
    accuracy), budget.png (labels bought, cumulative), classifier.png (Stage-I AUC of the CARE
    family, and for every buying strategy the share of its bought set that Oracle would also have
    bought, and the share with a wrong majority). Returns the written paths."""
    out = Path(out_dir)
    written = []
    by = defaultdict(list)
    for r in runs:
        by[group_key(r)].append(r)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, metric, name in ((axes[0], "mean8", "held-out mean@8"), (axes[1], "greedy", "held-out greedy")):
        _band_plot(ax, {k: [([e["step"] for e in r["evals"]], [e[metric] for e in r["evals"]]) for r in rs]
                        for k, rs in by.items()}, name, f"{name} vs step")
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    written.append(out / "accuracy.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    def steps_series(metric: str, cumulative: bool = False, only=None) -> dict:
        res = {}
        for k, rs in by.items():
            ser = []
            for r in rs:
                vals = [s.get(metric) for s in r["steps"]]
                if only is not None and all(v is None for v in vals):
                    continue
                if cumulative:
                    tot, cum = 0.0, []
                    for v in vals:
                        tot += v or 0
                        cum.append(tot)
                    vals = cum
                else:
                    vals = _smooth(vals, SMOOTH)
                ser.append(([s["step"] for s in r["steps"]], vals))
            if ser:
                res[k] = ser
        return res

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    _band_plot(ax, steps_series("pseudo_acc"), "majority = truth (batch)",
               f"pseudo-label accuracy ({SMOOTH}-step moving mean)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "pseudo_label.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    _band_plot(ax, steps_series("bought", cumulative=True), "GT labels bought (cumulative)", "budget spent")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "budget.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    cls_metrics = [("stage1_auc", "Stage-I AUC (majority correct)"),
                   ("sim/cag_recall", "bought set ∩ Oracle's top-k / k"),
                   ("sim/bought_wrong_majority", "bought prompts with a wrong majority")]
    present = [(m, t) for m, t in cls_metrics if any(s.get(m) is not None for r in runs for s in r["steps"])]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(5.2 * len(present), 4.6), squeeze=False)
        for ax, (m, title) in zip(axes[0], present):
            _band_plot(ax, steps_series(m, only=True), title, f"{title} ({SMOOTH}-step mean)")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "classifier.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def write_report(out_dir: Path | str, title: str, header: str = "", order: list[str] | None = None) -> Path:
    """Collect the finished runs under ``out_dir`` and write results.md, CSV/JSON and plots.

    Returns the path of results.md (which embeds the plots)."""
    out = Path(out_dir)
    runs = load_runs(out)
    table = results_table(runs, order) + "\n" + classifier_table(runs) if runs else "(no finished runs)\n"
    plots = write_plots(runs, out) if runs else []
    write_tables(runs, out)
    md = [f"# {title}", "", header, "", table, ""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = out / "results.md"
    path.write_text("\n".join(md) + "\n")
    return path
