"""The unit of work sent to a worker process: the symbolic merge of one group.

Runs the clustering rule of :mod:`care_ext.answers.cluster` with an equivalence oracle that first
consults the verdicts the caller already knows, then computes the rest, within a soft time budget
for the whole group. Returns the clusters, the gold's cluster and the newly computed verdicts
(for the caller's cache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from .cluster import KeyClass, assign_gold, merge_key_classes
from .keys import CanonicalKey

__all__ = ["SymbolicJob", "SymbolicResult", "run_symbolic_job", "pair_key"]


def pair_key(a: CanonicalKey, b: CanonicalKey) -> tuple[str, str]:
    """Cache key of an unordered pair of keys (the relation is symmetric)."""
    x, y = a.symbolic_form(), b.symbolic_form()
    return (x, y) if x <= y else (y, x)


@dataclass
class SymbolicJob:
    """One group's symbolic merge.

    Attributes:
        equivalence: the task's ``(a, b) -> bool``.
        classes: the group's key classes in rule order (members are not needed: empty tuples).
        gold: the gold key or None.
        known: verdicts already known to the caller, by :func:`pair_key`.
        budget_s: soft wall-time budget of the whole job; once spent, unknown pairs count as
            unequal (and are not reported as verdicts).
    """

    equivalence: Callable[[str, str], bool]
    classes: list[KeyClass]
    gold: CanonicalKey | None
    known: dict[tuple[str, str], bool]
    budget_s: float


@dataclass
class SymbolicResult:
    """Clusters (lists of class indices, creation order), the gold's cluster index (-1 = none),
    the new verdicts, and whether the budget ran out."""

    clusters: list[list[int]]
    gold_cluster: int
    verdicts: dict[tuple[str, str], bool]
    budget_exhausted: bool


def run_symbolic_job(job: SymbolicJob) -> SymbolicResult:
    """Execute ``job`` (in a worker process, or inline on a main thread)."""
    deadline = time.monotonic() + job.budget_s
    new: dict[tuple[str, str], bool] = {}
    exhausted = False

    def equal(a: CanonicalKey, b: CanonicalKey) -> bool:
        nonlocal exhausted
        pk = pair_key(a, b)
        v = job.known.get(pk)
        if v is None:
            v = new.get(pk)
        if v is not None:
            return v
        if time.monotonic() > deadline:
            exhausted = True
            return False
        v = bool(job.equivalence(a.symbolic_form(), b.symbolic_form()))
        new[pk] = v
        return v

    clusters = merge_key_classes(job.classes, equal)
    gold_cluster = assign_gold(job.classes, clusters, job.gold, equal)
    return SymbolicResult(clusters, gold_cluster, new, exhausted)


#: answer shapes parsed once by each worker at start: the parser builds its tables lazily per
#: shape, so the first tuple/interval/equation costs 100+ ms; better before the first job
WARM_UP_FORMS = ("(1,2)", "[0,1)", "x^2+1", "y=2x+1", "\\{1,2\\}", "3\\pi", "\\sqrt{2}", "10\\%", "\\text{A}")


def warm_up_math() -> None:
    """Worker warm-up: import math-verify, run one check, parse :data:`WARM_UP_FORMS`."""
    from .tasks import MATH_EQUIVALENCE

    MATH_EQUIVALENCE.warm_up()
    for f in WARM_UP_FORMS:
        MATH_EQUIVALENCE.parsed(f)
