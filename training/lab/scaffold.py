"""TEMPORARY development scaffold: lab-local answer ids and GT/TTRL/Random/Oracle decisions.

Exists only until care_ext.answers and the CARE core's step API are merged; then it is deleted so
that no lab-specific decision code remains.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from care_ext.ops import cag, cluster_stats, group_advantage


def scaffold_answer_ids(texts: list[list[str]], gold: list[int]) -> tuple[Tensor, Tensor]:
    """Digit between '#' and '$' (else -1) as the id itself; gold ids = gold digits."""
    def one(t: str) -> int:
        cut = t.find("$")
        if cut < 0:
            return -1
        body = t[:cut]
        pos = body.rfind("#")
        ans = body[pos + 1:] if pos >= 0 else ""
        return int(ans) if ans.isdigit() else -1
    return (torch.tensor([[one(t) for t in row] for row in texts], dtype=torch.long),
            torch.tensor(gold, dtype=torch.long))


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
    elif method == "ttrl_mask":
        keep = (r_ps == r_gt).all(dim=1)
    elif method == "random":
        bought[torch.randperm(b, generator=gen)[:k]] = True
    elif method == "oracle":
        score = cag(r_gt, r_ps) + 1e-6 * torch.rand(b, generator=gen)
        bought[torch.argsort(score, descending=True)[:k]] = True
    rewards = torch.where(bought[:, None], r_gt, r_ps)
    return ScaffoldDecision(rewards, torch.ones(b), keep, bought)
