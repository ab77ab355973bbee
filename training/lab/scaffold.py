"""TEMPORARY development scaffold: lab-local GT/TTRL/TTRL-mask/Random/Oracle decisions.

Exists only until the CARE core's step API is merged; then it is deleted so
that no lab-specific decision code remains.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from care_ext.ops import cag, cluster_stats, group_advantage


@dataclass
class ScaffoldDecision:
    rewards: Tensor
    weights: Tensor
    keep: Tensor
    bought: Tensor


def scaffold_decide(method: str, ids: Tensor, gold_ids: Tensor, budget: float,
                    gen: torch.Generator) -> ScaffoldDecision:
    b, g = ids.shape
    rank, _ = cluster_stats(ids)
    r_ps = (rank == 0).float()
    r_gt = ((ids >= 0) & (ids == gold_ids[:, None])).float()
    keep = torch.ones(b, dtype=torch.bool)
    bought = torch.zeros(b, dtype=torch.bool)
    k = round(budget * b)
    if method == "gt":
        bought[:] = True
    elif method == "ttrl-mask":
        keep = (r_ps == r_gt).all(dim=1)
    elif method == "random":
        bought[torch.randperm(b, generator=gen)[:k]] = True
    elif method == "oracle":
        score = cag(r_gt, r_ps) + 1e-6 * torch.rand(b, generator=gen)
        bought[torch.argsort(score, descending=True)[:k]] = True
    rewards = torch.where(bought[:, None], r_gt, r_ps)
    return ScaffoldDecision(rewards, torch.ones(b), keep, bought)
