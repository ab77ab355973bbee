"""What :meth:`CareController.decide` returns to the host, and how the host uses it.

Host recipe for one RL step (B prompts x G rollouts)::

    d = care.decide(uids, ids, lengths=..., h_prompt=..., h_resp=...)
    # 1. reward of rollout (b, i): d.rewards[b, i]  (gold reward if bought/cached, else pseudo)
    # 2. the host's own GRPO advantage of those rewards, per prompt (its normalisation)
    # 3. multiply prompt b's advantages by d.weight[b]; rows with d.keep[b] False have weight 0
    #    and may be removed from the batch (no backward pass needed)
    # (or use d.advantages = group_advantage(d.rewards) * d.weight with the config's convention)
    policy_update(...)
    care.update()            # trains the classifiers on this step's labels (+ replay)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

TRUSTED = 0
"""Trained on its majority-vote pseudo-label (weight = the strategy's trust weight)."""
BOUGHT = 1
"""Gold label obtained through the oracle at this step (weight 1)."""
CACHED = 2
"""Gold label bought at an earlier step, reused for free (weight 1)."""
DROPPED = 3
"""No gradient (weight 0): not trusted and not bought, waiting for an async label, oracle
failure, or non-finite features under ``nonfinite='drop'``."""
SOURCE_NAMES = {TRUSTED: "trusted", BOUGHT: "bought", CACHED: "cached", DROPPED: "dropped"}


@dataclass
class Decision:
    """Per-prompt decisions of one step. All tensors are on the CPU.

    Attributes:
        step: 0-based index of the decide call.
        source: int8 [B], one of TRUSTED / BOUGHT / CACHED / DROPPED.
        rewards: float32 [B, G]: gold rewards (answer id == gold id) for BOUGHT/CACHED rows,
            majority-vote pseudo rewards (1 on the majority cluster) otherwise.
        weight: float32 [B]: per-prompt advantage multiplier (0 for DROPPED).
        advantages: float32 [B, G]: group_advantage(rewards) * weight under the config's
            convention (adv_eps, adv_unbiased), for hosts without their own.
        pseudo_adv: float32 [B, G]: advantages of the pseudo rewards (from the fused op).
        gold_ids: int64 [B]: gold answer id of BOUGHT/CACHED rows, -1 elsewhere (or no match).
        score: float32 [B]: the strategy's acquisition score (NaN where it has none).
        reliability: float32 [B] Stage-I P(majority correct) (CARE family), else None.
        labels_bought: rows whose source is BOUGHT: gold labels the oracle delivered for this
            step's own rows (every row of a repeated uid counts), including free retries of a
            charge made at an earlier step (a crash between "requested" and "stored") and labels
            stored by an interrupted run of this step. Not the budget charge: an asynchronous
            request is charged now but counts 0 here (its label arrives later as CACHED); the
            charge of this step is ``metrics["budget/labels_step"]``.
        metrics: dict[str, float]; keys ``sim/*`` read unbought gold (simulation only).
    """

    step: int
    source: Tensor
    rewards: Tensor
    weight: Tensor
    advantages: Tensor
    pseudo_adv: Tensor
    gold_ids: Tensor
    score: Tensor
    reliability: Tensor | None
    labels_bought: int
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def keep(self) -> Tensor:
        """bool [B]: rows that get a gradient (source != DROPPED)."""
        return self.source != DROPPED
