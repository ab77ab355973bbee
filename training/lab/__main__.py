"""`python -m training.lab [smoke|quick|full]`: the CPU miniature that shows CARE working.

Trains (or loads from the cache) the SFT checkpoint, runs GRPO with each strategy, then writes
results.md (table + plots), steps.csv, evals.csv, all_runs.json and PNG plots to the output folder
and prints the table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from .presets import PRESETS
from .report import write_report
from .runner import build_specs, override_steps, run_grid
from .sft import checkpoint_path, default_cache_dir, load_or_train_sft
from .strategies import available_methods


def _csv(kind):
    return lambda s: tuple(kind(x) for x in s.split(",") if x.strip())


def _override(text: str) -> tuple[str, object]:
    key, _, raw = text.partition("=")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see --help)."""
    p = argparse.ArgumentParser(prog="python -m training.lab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", nargs="?", default="quick", choices=sorted(PRESETS),
                   help="; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()).replace("%", "%%"))
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/lab/<preset>)")
    p.add_argument("--methods", type=_csv(str), default=None,
                   help="comma-separated strategies (default: the preset's; 'all' = every one)")
    p.add_argument("--seeds", type=_csv(int), default=None, help="comma-separated seeds")
    p.add_argument("--budgets", type=_csv(float), default=None, help="comma-separated budgets p")
    p.add_argument("--steps", type=int, default=None, help="GRPO steps per run")
    p.add_argument("--jobs", type=int, default=None, help="worker processes (one thread each)")
    p.add_argument("--care", action="append", default=[], metavar="FIELD=VALUE",
                   help="CareConfig override for every run, e.g. --care alpha=0.1 (repeatable; "
                        "values parsed as JSON, else kept as strings)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"SFT checkpoint cache (default $CARE_LAB_CACHE or {default_cache_dir()})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report of --out")
    p.add_argument("--list-methods", action="store_true", help="print the strategies and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m training.lab` and of the `care-lab` console script."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.list_methods:
        print("\n".join(available_methods()))
        return 0
    preset = PRESETS[args.preset]
    if args.seeds:
        preset = replace(preset, seeds=args.seeds)
    if args.budgets:
        preset = replace(preset, budgets=args.budgets)
    methods = args.methods or preset.methods or available_methods()
    if methods == ("all",):
        methods = available_methods()
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        print(f"unknown strategies {unknown}; available: {', '.join(available_methods())}", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / "lab" / preset.name
    out.mkdir(parents=True, exist_ok=True)
    header = (f"preset `{preset.name}`: methods {', '.join(methods)}; seeds {list(preset.seeds)}; "
              f"budgets {list(preset.budgets)}" + (f"; CARE overrides {args.care}" if args.care else ""))
    if not args.report_only:
        t0 = time.time()
        cached = checkpoint_path(preset.sft, args.cache_dir).exists()
        bar = tqdm(total=preset.sft.steps, desc="SFT", unit="step",
                   disable=args.no_progress or cached, dynamic_ncols=True)
        sft_path, info = load_or_train_sft(preset.sft, args.cache_dir,
                                           progress=lambda s, loss: bar.update(1),
                                           log=lambda m: tqdm.write(m))
        bar.close()
        print(f"[lab] SFT checkpoint {sft_path} ({'cached' if info['cached'] else 'trained'}; "
              f"final loss {info['final_loss']:.3f})")
        grpo = override_steps(preset, args.steps)
        care = tuple(_override(c) for c in args.care)
        specs = build_specs(preset, methods, str(sft_path), grpo, care)
        jobs = args.jobs if args.jobs is not None else preset.jobs
        print(f"[lab] {len(specs)} runs x {grpo.steps} steps on {jobs} process(es) -> {out}")
        run_grid(specs, out, jobs=jobs, progress=not args.no_progress)
        header += f"; wall time {time.time() - t0:.0f} s (this invocation)"
    path = write_report(out, f"CPU miniature: preset {preset.name}", header,
                        order=list(available_methods()))
    text = path.read_text()
    print(text[text.index("### Mean"):text.index("### Per run")] if "### Mean" in text else text)
    print(f"[lab] report: {path} (plots, steps.csv, evals.csv, all_runs.json beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
