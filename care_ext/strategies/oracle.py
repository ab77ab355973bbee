"""Simulation-only baselines that read every prompt's gold: TTRL-mask, Oracle(-mask), Oracle-decay.

They refuse to run without a simulation oracle (the controller checks ``simulation_only``).
"""
from __future__ import annotations

import torch

from .base import Plan, StepContext, Strategy, all_trusted


class TTRLMask(Strategy):
    """Buy nothing; train on the pseudo-label where the majority is right, drop the rest."""

    name = "ttrl-mask"
    simulation_only = True

    def plan(self, ctx: StepContext) -> Plan:
        return Plan(None, ctx.majority_correct(), torch.ones(ctx.B))


class OracleCAG(Strategy):
    """Buy the top ceil(p * B) prompts by true CAG (ties to the lower row index)."""

    simulation_only = True

    def __init__(self, mask: bool = False) -> None:
        self.mask = mask
        self.name = "oracle-mask" if mask else "oracle"

    def plan(self, ctx: StepContext) -> Plan:
        trusted, w = all_trusted(ctx.B, not self.mask)
        return Plan(ctx.true_cag(), trusted, w)


class OracleDecay(Strategy):
    """Oracle's purchases; every other prompt trains on its pseudo-label with weight
    exp(-decay_lambda * true CAG)."""

    name = "oracle-decay"
    simulation_only = True

    def plan(self, ctx: StepContext) -> Plan:
        cag = ctx.true_cag()
        trusted = torch.ones(ctx.B, dtype=torch.bool)
        return Plan(cag, trusted, torch.exp(-ctx.cfg.decay_lambda * cag).float())
