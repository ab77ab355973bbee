"""What a strategy sees (:class:`StepContext`) and what it returns (:class:`Plan`).

A strategy only *ranks*: it never touches the budget, the oracle or the store. The controller
turns a plan into decisions with the same budget semantics for every strategy:

1. rows with a label bought at an earlier step are CACHED (free), rows waiting for an asynchronous
   label are DROPPED; the others are *fresh*;
2. an audit slice (``audit_frac`` of the cap) is drawn uniformly from the fresh rows;
3. the rest of the cap ceil(p * B) (B for GT) goes to the fresh rows in the order
   (priority desc, score desc, row index asc); rows with a NaN score are never bought;
4. a fresh row that was not bought is TRUSTED (pseudo-label, weight ``trust_weight``) if
   ``trusted`` says so, else DROPPED.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..config import CareConfig


def top_rows(score: Tensor, eligible: Tensor, k: int) -> Tensor:
    """bool [B]: the k eligible rows with the highest score, ties to the lower index.

    Only eligible rows are ever picked (fewer than k if fewer are eligible); a NaN score makes a
    row ineligible (like a NaN acquisition score, which is never bought), -inf ranks last."""
    rows = (eligible & ~torch.isnan(score)).nonzero().flatten()
    order = rows[torch.sort(-score[rows].double(), stable=True).indices]
    out = torch.zeros_like(eligible)
    out[order[:max(k, 0)]] = True
    return out


def gold_correct(ids: Tensor, gold: Tensor) -> Tensor:
    """bool [..., G]: rollouts whose answer id equals the gold id ``gold`` [...] (-1: no gold)."""
    return (ids == gold[..., None]) & (gold[..., None] >= 0)


def cluster_entropy(sizes: Tensor) -> Tensor:
    """float64 [B]: Shannon entropy (nats) of the cluster-size distribution over valid answers
    (sizes int64 [B, G] as ``cluster_stats`` returns; 0 when nothing is valid)."""
    p = sizes.double() / sizes.sum(1, keepdim=True).clamp(min=1).double()
    return -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(1)


@dataclass
class StepContext:
    """Per-step inputs of a strategy. B prompts, G rollouts; tensors on the CPU.

    Attributes:
        cfg: effective config (ablation overrides applied). step: 0-based decide index.
        ids int64 [B, G]; rank int64 [B, G]; sizes int64 [B, G]; cag float32 [B, G+1];
        admissible bool [B, G+1]; pseudo_rewards float32 [B, G]: from the ops.
        fresh bool [B]: rows a strategy may buy or trust (no known label, not waiting).
        reliability float32 [B] / ecag float32 [B]: Stage-I P(majority correct) and Stage-II
            score (expected CAG, or predicted CAG for the regression ablation); learned only.
        mean_prob float32 [B, G] or None: per-rollout mean token probability (Prob).
        rng: the run's generator for random choices (saved with the state).
        gold_ids: callable -> int64 [B] gold answer id of every row (-1: none). Simulation only:
            it raises SimulationOnlyError with a non-simulation oracle.
    """

    cfg: CareConfig
    step: int
    ids: Tensor
    rank: Tensor
    sizes: Tensor
    cag: Tensor
    admissible: Tensor
    pseudo_rewards: Tensor
    fresh: Tensor
    rng: torch.Generator
    gold_ids: Callable[[], Tensor]
    reliability: Tensor | None = None
    ecag: Tensor | None = None
    mean_prob: Tensor | None = None

    @property
    def B(self) -> int:
        return self.ids.shape[0]

    def true_rewards(self) -> Tensor:
        """float32 [B, G] gold rewards of every row (simulation only)."""
        return gold_correct(self.ids, self.gold_ids()).float()

    def majority_correct(self) -> Tensor:
        """bool [B]: the majority cluster matches the gold (simulation only)."""
        return ((self.rank == 0) & (self.true_rewards() > 0)).any(dim=1)

    def true_cag(self) -> Tensor:
        """float32 [B] CAG of the pseudo vs the gold rewards (simulation only)."""
        from .. import ops
        return ops.cag(self.true_rewards(), self.pseudo_rewards, self.cfg.cag_eps,
                       self.cfg.cag_unbiased)


@dataclass
class Plan:
    """A strategy's ranking for one step (all [B]).

    Attributes:
        score: float; higher is bought first; NaN = never bought. None = the strategy buys nothing.
        trusted: bool; a fresh row that is not bought trains on its pseudo-label.
        trust_weight: float32 advantage weight of a trusted row.
        priority: bool or None; priority rows are bought before all others.
        buy_all: the per-step cap is B instead of ceil(p * B) (GT).
    """

    score: Tensor | None
    trusted: Tensor
    trust_weight: Tensor
    priority: Tensor | None = None
    buy_all: bool = False
    extra: dict = field(default_factory=dict)


class Strategy:
    """Base class. Class attributes describe the strategy to the controller:

    simulation_only: reads unbought gold (refused without a simulation oracle).
    learned: needs hidden states and trains the classifiers (CARE family).
    needs_logprobs: needs per-rollout token log-probs (Prob).
    regression: Stage-II regresses CAG instead of count classes.
    config_overrides: config fields this strategy pins (its ablation).
    """

    name = "base"
    simulation_only = False
    learned = False
    needs_logprobs = False
    regression = False
    config_overrides: dict = {}

    def plan(self, ctx: StepContext) -> Plan:
        raise NotImplementedError


def all_trusted(B: int, trusted: bool) -> tuple[Tensor, Tensor]:
    """(trusted [B], weight [B]) with every row trusted (weight 1) or none."""
    return torch.full((B,), trusted, dtype=torch.bool), torch.ones(B)
