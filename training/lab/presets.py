"""Named presets: smoke (CI end-to-end), quick (the README's main command), full (the study)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .grpo import GRPOConfig
from .sft import SFTConfig

QUICK_METHODS = ("gt", "ttrl", "random", "oracle", "care")
"""The README's comparison: GT and TTRL references, Random and Oracle at the same budget, CARE."""


@dataclass(frozen=True)
class Preset:
    """A grid of runs and the settings shared by all of them.

    Attributes:
        name: preset name (also the default output folder name).
        methods: strategy names (None = every strategy the CARE core offers).
        seeds: run seeds.
        budgets: label budgets p (fraction of each step's prompts); strategies that never buy
            a subset (GT, TTRL, TTRL-mask) run once per seed, not once per budget.
        sft: the SFT recipe of the shared checkpoint.
        grpo: GRPO hyper-parameters.
        eval_every, eval_size, eval_samples: evaluation schedule and size.
        jobs: default number of worker processes (each uses one torch thread).
        description: one line for --help.
    """

    name: str
    methods: tuple[str, ...] | None
    seeds: tuple[int, ...]
    budgets: tuple[float, ...]
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval_every: int = 20
    eval_size: int = 256
    eval_samples: int = 8
    jobs: int = 2
    description: str = ""


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        "smoke", None, (0,), (0.2,), sft=SFTConfig(steps=40, batch_size=64, warmup_steps=5),
        grpo=replace(GRPOConfig(), steps=3, prompts_per_step=16), eval_every=3, eval_size=32,
        eval_samples=4, jobs=1,
        description="every strategy for 3 steps on a 40-step SFT checkpoint (CI end-to-end, < 2 min)"),
    "quick": Preset(
        "quick", QUICK_METHODS, (0,), (0.2,),
        description="GT, TTRL, Random, Oracle, CARE at 20%, 1 seed, 200 steps (<= 15 min on 2 cores)"),
    "full": Preset(
        "full", None, (0, 1, 2, 3, 4), (0.2, 0.1),
        description="every strategy, 5 seeds, budgets 20% and 10% (resumable; hours on 2 cores)"),
}
