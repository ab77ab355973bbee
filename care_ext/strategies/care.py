"""CARE and its ablations (§1, §5).

Per step: after ``warmup_steps`` decide calls, the top ceil(alpha * B) fresh prompts by Stage-I
reliability are trusted (pseudo-label, weight = reliability [paper Eq. 7] or the official
clip(soft_adv * E[CAG], 0, 1)); the budget goes to the other fresh prompts by Stage-II expected
CAG (trusted ones only if too few others remain and ``buy_trusted_if_short``); everything else is
dropped.

Ablations: ``care-regression`` (Stage-II regresses the CAG, score = predicted CAG),
``care-no-pseudo`` (alpha = 0: nothing is trusted), ``care-no-stage2`` (buy by 1 - reliability),
``care-no-aux`` (aux_weight = 0), ``care-no-balance`` (class_balance_power = 0).

Beyond the paper: ``care-entropy`` keeps the Stage-I gate and the drop, but buys the untrusted
prompts with the highest answer-cluster entropy (the free feature of the ``entropy`` baseline)
instead of Stage-II's expected CAG; Stage-II is still trained (its metrics stay comparable). In
the lab, ``entropy-mask`` (entropy buys, no trust, drop the rest) matched or beat CARE at 10%,
which this variant tests inside CARE's own gate.
"""
from __future__ import annotations

import math

import torch

from ..config import ceil_frac
from .base import Plan, StepContext, Strategy, cluster_entropy, top_rows


class Care(Strategy):
    """The CARE family; ``variant`` is '' (CARE) or one ablation suffix."""

    learned = True
    VARIANTS = {
        "": {},
        "regression": {},
        "no-pseudo": {"alpha": 0.0},
        "no-stage2": {},
        "no-aux": {"aux_weight": 0.0},
        "no-balance": {"class_balance_power": 0.0},
        "entropy": {},
    }

    def __init__(self, variant: str = "") -> None:
        if variant not in self.VARIANTS:
            raise ValueError(f"unknown CARE variant {variant!r}")
        self.variant = variant
        self.name = "care" + (f"-{variant}" if variant else "")
        self.regression = variant == "regression"
        self.config_overrides = dict(self.VARIANTS[variant])

    def plan(self, ctx: StepContext) -> Plan:
        cfg, B = ctx.cfg, ctx.B
        rel = ctx.reliability
        k1 = ceil_frac(cfg.alpha, B) if ctx.step >= cfg.warmup_steps else 0
        if cfg.trust_weight == "reliability":
            weight = rel.float().clone()
        else:
            weight = (cfg.soft_adv * ctx.ecag).clamp(0.0, 1.0).float()
        # a row whose classifier output is not finite (e.g. overflowing but finite hidden states)
        # is never trusted: its advantage weight would be NaN
        trusted = top_rows(rel, ctx.fresh & torch.isfinite(weight), k1)
        if self.variant == "no-stage2":
            score = 1.0 - rel
        elif self.variant == "entropy":
            score = cluster_entropy(ctx.sizes)
        else:
            score = ctx.ecag
        score = score.float().clone()
        if not cfg.buy_trusted_if_short:
            score[trusted] = math.nan
        return Plan(score, trusted, weight, priority=~trusted)
