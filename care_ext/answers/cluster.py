"""The clustering rule: key classes -> clusters, deterministic and invariant to response order.

Input: the responses of one group, reduced to *key classes* (responses with identical canonical
key text). Equivalence between distinct keys is a symmetric but **not transitive** relation
(math-verify: "10\\%" equals both "10" and "0.1", which differ), so the rule is fixed here:

1. Order the key classes by (size descending, key text ascending). Both are functions of the
   multiset of answers, so the order - and everything below - does not depend on the order of
   the G responses.
2. Walk the classes in that order. A class joins the first existing cluster (in creation order)
   whose *representative* (the cluster's first, largest class) it is equivalent to, provided the
   cluster does not already hold an exact-number key (a cluster holds at most one number key:
   two distinct integers or fractions are never merged, even through a third answer).
   Otherwise it opens a new cluster, as its representative.
3. Keys that are not ``symbolic`` (pathological answers, exact tasks) are compared with nothing:
   they merge only with identical keys (already done by the key classes). Two number keys are
   never compared (distinct values are unequal), nor two keys whose constant values (fast
   evaluator) clearly differ. Every other pair of distinct keys is decided by the task's
   symmetric equivalence (math: math-verify in both directions).
4. Cluster ids: clusters sorted by (total size descending, representative key text ascending),
   numbered 0, 1, ...; invalid responses get -1.
5. Gold: a gold key equal to a member key maps to that member's cluster; otherwise it goes
   through step 2 as one more class arriving last (without changing the response clusters) and
   maps to the cluster it would join, else -1.

At most one equivalence call per (class, existing cluster) pair, so at most k(k-1)/2 for k
distinct keys, and usually far fewer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .keys import CanonicalKey
from .numeval import clearly_different

__all__ = ["KeyClass", "group_key_classes", "merge_key_classes", "assign_gold", "comparable", "cluster_ids"]


@dataclass(frozen=True, slots=True)
class KeyClass:
    """Responses of one group that share a canonical key; ``members`` are response indices."""

    key: CanonicalKey
    members: tuple[int, ...]


def group_key_classes(keys: Sequence[CanonicalKey | None]) -> list[KeyClass]:
    """Group the valid keys of one group into key classes, ordered by the rule's step 1."""
    by_text: dict[str, list[int]] = {}
    first: dict[str, CanonicalKey] = {}
    for i, k in enumerate(keys):
        if k is None:
            continue
        lst = by_text.get(k.text)
        if lst is None:
            by_text[k.text] = [i]
            first[k.text] = k
        else:
            lst.append(i)
    classes = [KeyClass(first[t], tuple(m)) for t, m in by_text.items()]
    classes.sort(key=lambda c: (-len(c.members), c.key.text))
    return classes


def comparable(a: CanonicalKey, b: CanonicalKey) -> bool:
    """Whether two distinct keys need an equivalence call (else they are unequal).

    Unequal without a call: either key not ``symbolic``; both exact numbers; both with a known
    constant value and the values clearly different (:func:`care_ext.answers.numeval.clearly_different`).
    """
    return (
        a.symbolic
        and b.symbolic
        and not (a.number and b.number)
        and not clearly_different(a.value, b.value)
    )


EqualFn = Callable[[CanonicalKey, CanonicalKey], bool]


def merge_key_classes(classes: Sequence[KeyClass], equal: EqualFn) -> list[list[int]]:
    """Step 2 of the rule: clusters as lists of class indices, in creation order.

    ``classes`` must be in the order of :func:`group_key_classes`; ``equal(rep, key)`` is only
    called on distinct, :func:`comparable` keys.
    """
    clusters: list[list[int]] = []
    has_number: list[bool] = []
    for ci, cls in enumerate(classes):
        k = cls.key
        target = -1
        if k.symbolic:
            for j, cl in enumerate(clusters):
                if k.number and has_number[j]:
                    continue
                rep = classes[cl[0]].key
                if comparable(rep, k) and equal(rep, k):
                    target = j
                    break
        if target < 0:
            clusters.append([ci])
            has_number.append(k.number)
        else:
            clusters[target].append(ci)
            has_number[target] = has_number[target] or k.number
    return clusters


def assign_gold(
    classes: Sequence[KeyClass], clusters: Sequence[Sequence[int]], gold: CanonicalKey | None, equal: EqualFn
) -> int:
    """Step 5 of the rule: index (creation order) of the cluster the gold maps to, or -1."""
    if gold is None:
        return -1
    for j, cl in enumerate(clusters):
        if any(classes[ci].key.text == gold.text for ci in cl):
            return j
    if not gold.symbolic:
        return -1
    for j, cl in enumerate(clusters):
        if gold.number and any(classes[ci].key.number for ci in cl):
            continue
        rep = classes[cl[0]].key
        if comparable(rep, gold) and equal(rep, gold):
            return j
    return -1


def cluster_ids(
    n: int, classes: Sequence[KeyClass], clusters: Sequence[Sequence[int]], gold_cluster: int = -1
) -> tuple[list[int], int]:
    """Step 4: per-response cluster ids (length ``n``, -1 = invalid) and the gold's id."""
    sizes = [sum(len(classes[ci].members) for ci in cl) for cl in clusters]
    order = sorted(range(len(clusters)), key=lambda j: (-sizes[j], classes[clusters[j][0]].key.text))
    rank = {j: r for r, j in enumerate(order)}
    ids = [-1] * n
    for j, cl in enumerate(clusters):
        for ci in cl:
            for m in classes[ci].members:
                ids[m] = rank[j]
    return ids, (rank[gold_cluster] if gold_cluster >= 0 else -1)
