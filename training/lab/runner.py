"""Run a grid of lab runs over worker processes (one torch thread each) with one progress bar."""
from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from .experiment import RunSpec, run
from .grpo import GRPOConfig
from .presets import Preset
from .strategies import is_budgeted


def build_specs(preset: Preset, methods: Iterable[str], sft_path: str,
                grpo: GRPOConfig | None = None, care: tuple = ()) -> list[RunSpec]:
    """One spec per (method, budget, seed); budget-free methods get one spec per seed (their
    budget field is the first budget, which they ignore). ``care``: CareConfig overrides as
    (field, value) pairs applied to every run."""
    specs = []
    for method in methods:
        budgets = preset.budgets if is_budgeted(method) else preset.budgets[:1]
        for budget in budgets:
            for seed in preset.seeds:
                specs.append(RunSpec(method=method, seed=seed, budget=budget, sft_path=sft_path,
                                     grpo=grpo or preset.grpo, task=preset.sft.task,
                                     eval_every=preset.eval_every, eval_size=preset.eval_size,
                                     eval_samples=preset.eval_samples, care=tuple(care)))
    return specs


def _worker(spec: RunSpec, out_dir: str, q) -> dict:
    import torch

    torch.set_num_threads(1)
    return run(spec, out_dir, on_step=lambda s: q.put(1))


def run_grid(specs: list[RunSpec], out_dir: Path | str, jobs: int = 1, progress: bool = True,
             desc: str = "GRPO") -> list[dict]:
    """Run every spec (finished runs under ``out_dir/runs`` are skipped) and return their results.

    Args:
        jobs: worker processes (spawned; 1 = run in this process).
        progress: show one tqdm bar over all steps of all runs.
    """
    runs_dir = Path(out_dir) / "runs"
    total = sum(s.grpo.steps for s in specs)
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    if jobs <= 1:
        results = []
        for spec in specs:
            bar.set_postfix_str(spec.name)
            results.append(run(spec, runs_dir, on_step=lambda s: bar.update(1)))
        bar.close()
        return results
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(jobs) as pool:
        q = manager.Queue()
        pending = [pool.apply_async(_worker, (spec, str(runs_dir), q)) for spec in specs]
        done = 0
        while done < len(pending):
            try:
                bar.update(q.get(timeout=0.5))
            except queue_mod.Empty:
                pass
            done = sum(p.ready() for p in pending)
        while True:
            try:
                bar.update(q.get_nowait())
            except queue_mod.Empty:
                break
        bar.close()
        return [p.get() for p in pending]


def override_steps(preset: Preset, steps: int | None) -> GRPOConfig:
    """The preset's GRPO config, with ``steps`` replaced when given."""
    return preset.grpo if steps is None else replace(preset.grpo, steps=steps)
