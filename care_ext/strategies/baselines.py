"""Baselines that need no gold: GT, TTRL, Random, Entropy, Prob (each but GT/TTRL with ``-mask``).

Without ``-mask`` a fresh prompt that is not bought trains on its pseudo-label with weight 1; with
``-mask`` it is dropped.
"""
from __future__ import annotations

import torch

from .base import Plan, StepContext, Strategy, all_trusted, cluster_entropy


class GT(Strategy):
    """Buy every prompt (cap B per step; a global cap may still stop it: the rest are dropped)."""

    name = "gt"

    def plan(self, ctx: StepContext) -> Plan:
        trusted, w = all_trusted(ctx.B, False)
        return Plan(torch.zeros(ctx.B), trusted, w, buy_all=True)


class TTRL(Strategy):
    """Buy nothing; every prompt trains on its majority-vote pseudo-label with weight 1."""

    name = "ttrl"

    def plan(self, ctx: StepContext) -> Plan:
        trusted, w = all_trusted(ctx.B, True)
        return Plan(None, trusted, w)


class _Ranked(Strategy):
    """Buy the top ceil(p * B) by :meth:`score`; the rest are trusted (or dropped with mask)."""

    def __init__(self, mask: bool = False) -> None:
        self.mask = mask
        self.name = self.base_name + ("-mask" if mask else "")

    def score(self, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def plan(self, ctx: StepContext) -> Plan:
        trusted, w = all_trusted(ctx.B, not self.mask)
        return Plan(self.score(ctx), trusted, w)


class Random(_Ranked):
    """Uniformly random prompts (drawn from the run's seeded generator)."""

    base_name = "random"

    def score(self, ctx: StepContext) -> torch.Tensor:
        return torch.rand(ctx.B, generator=ctx.rng)


class Entropy(_Ranked):
    """Highest Shannon entropy (nats) of the answer-cluster distribution over valid answers
    (a prompt with no valid answer has entropy 0)."""

    base_name = "entropy"

    def score(self, ctx: StepContext) -> torch.Tensor:
        return cluster_entropy(ctx.sizes).float()


class Prob(_Ranked):
    """Lowest mean token probability: per rollout the mean over its tokens of exp(log-prob)
    (or exp of the mean log-prob when only that is given), averaged over the G rollouts."""

    base_name = "prob"
    needs_logprobs = True

    def score(self, ctx: StepContext) -> torch.Tensor:
        return -ctx.mean_prob.double().mean(1).float()
