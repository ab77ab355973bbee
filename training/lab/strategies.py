"""The lab's view of the CARE core's strategies: names, and how the lab wires a run to the core.

Every decision (rewards, weights, which prompts are dropped, which labels are bought, classifier
training) is made by :class:`care_ext.step.CareController`; the lab only supplies the step's
answer ids, lengths, hidden states and log-probs, and a simulation oracle holding the gold answers.
"""
from __future__ import annotations

from typing import Any

from care_ext.answers import answer_ids
from care_ext.config import CareConfig
from care_ext.labels import GoldOracle
from care_ext.step import CareController
from care_ext.strategies import STRATEGIES

from .evaluate import ANSWER_TASK

UNBUDGETED = ("gt", "ttrl", "ttrl-mask")
"""Strategies whose decisions do not depend on the budget p (they run once per seed)."""


def available_methods() -> tuple[str, ...]:
    """Every strategy of the CARE core (registry order: references, baselines, CARE family)."""
    return tuple(STRATEGIES)


def is_budgeted(method: str) -> bool:
    """Whether the strategy buys a budgeted subset of labels (then it runs once per budget)."""
    return method not in UNBUDGETED


def resolve_arith_label(label: Any, payload: list[str]) -> int:
    """Gold answer id of a bought label in its row's answer-id space.

    Args:
        label: the gold answer digit (int) as the oracle returns it.
        payload: the row's G response texts (ids are local to a row, so the gold is placed among
            that row's clusters by care_ext.answers itself).

    Returns:
        the id of the cluster equal to the gold, or -1 when no response gave it.
    """
    _, gold_ids = answer_ids([payload], ANSWER_TASK, [label])
    return int(gold_ids[0])


def make_controller(method: str, budget: float, seed: int, group_size: int, hidden_size: int,
                    max_len: float, gold: dict[str, int], overrides: dict | None = None
                    ) -> CareController:
    """A CareController for one lab run.

    Args:
        method: core strategy name; budget: p; seed: the controller's seed (classifier init,
            replay sampling, Random's picks).
        group_size, hidden_size: G and H of the policy's rollouts.
        max_len: the length normaliser of the Stage-I length feature (the lab's response cap).
        gold: uid -> gold answer digit, filled by the lab as prompts are drawn; read only through
            the core's GoldOracle (bought labels, and simulation-only strategies/metrics).
        overrides: extra CareConfig fields (e.g. {"alpha": 0.1}); None = the core's defaults.
    """
    cfg = CareConfig(strategy=method, group_size=group_size, hidden_size=hidden_size, seed=seed,
                     budget_frac=budget, max_len=float(max_len), **(overrides or {}))
    return CareController(cfg, GoldOracle(gold), None, resolve_label=resolve_arith_label)
