"""Training samples from one decide step's rows (§5): each row's features, gathered per field
for all rows at once, and the labels its gold answer id defines.

:func:`row_parts` collects what a sample keeps of a row (the fused op's per-prompt features and
the row's own copy of its hidden states); :func:`make_samples` turns such rows and their gold
ids into :class:`~care_ext.replay.Sample` objects, computing the labels of all rows together.
The controller calls them for the rows it bought (and, later, for asynchronous labels).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .replay import Sample
from .strategies.base import gold_correct

GF_PARTS = (("rank", "rank"), ("prompt_feat", "prompt_feat"), ("len_norm", "len_norm"),
            ("minority", "minority_mask"), ("admissible", "admissible"), ("cag", "cag"))
"""(part name, GroupFeatures field) of the features a row's sample keeps from the fused op."""


def row_parts(rows: list[int], ids: Tensor, gf, hp: list[Tensor], hr: list[Tensor]) -> list[dict]:
    """The features a training sample keeps, one dict per row of ``rows``.

    Args:
        rows: batch rows, in the order wanted. ids: int64 [B, G] answer ids of the step.
        gf: the step's :class:`care_ext.reference.GroupFeatures`.
        hp, hr: the rows' own CPU copies of h_prompt [H] and h_resp [G, H], in ``rows`` order
            (:meth:`care_ext.step.CareController._raw_rows`).

    Returns:
        dicts with ``ids`` [G] (int64), ``rank`` [G], ``prompt_feat`` [1+G], ``len_norm`` [G],
        ``minority`` [G], ``admissible`` [G+1], ``cag`` [G+1] (as in
        :class:`~care_ext.replay.Sample`), ``h_prompt`` and ``h_resp``. The small features of all
        rows are gathered once per field and split into per-row views (about 31 G bytes per row
        with its ``correct``, 0.5 KB at G = 16, so a step's gathered block outliving some of its
        rows costs little); the step's B x G inputs are never referenced.
    """
    if not rows:
        return []
    idx = torch.tensor(rows, dtype=torch.long)
    src = {"ids": ids, **{name: getattr(gf, field) for name, field in GF_PARTS}}
    small = {name: t[idx].unbind(0) for name, t in src.items()}
    return [{**{name: small[name][j] for name in small}, "h_prompt": hp[j], "h_resp": hr[j]}
            for j in range(len(rows))]


def make_samples(parts: list[dict], gold: list[int]) -> list[Sample]:
    """Training samples from rows' features (:func:`row_parts` dicts) and their gold answer ids
    (-1: none), the labels of all rows computed together:

    - ``correct`` [G]: the rollouts whose id is the gold's;
    - ``majority_correct``: a correct rollout has rank 0 (the majority cluster);
    - ``count``: 0 if the majority is correct, else the correct rollouts outside it;
    - ``true_cag``: 0.0 if the majority is correct, else ``cag[count]``.

    Raises:
        ValueError: a row's count label is not admissible for its cluster sizes (the first such
            row; no sample is made then).
    """
    if not parts:
        return []
    ids = torch.stack([p["ids"] for p in parts])
    rank = torch.stack([p["rank"] for p in parts])
    correct = gold_correct(ids, torch.tensor(gold, dtype=torch.long))
    maj = (correct & (rank == 0)).any(1)
    count = torch.where(maj, 0, (correct & (rank > 0)).sum(1))
    adm = torch.stack([p["admissible"] for p in parts]).gather(1, count[:, None])[:, 0]
    if not bool(adm.all()):
        j = int((~adm).nonzero()[0, 0])
        raise ValueError(f"count label {int(count[j])} is not admissible for cluster sizes of "
                         "this prompt")
    cag = torch.stack([p["cag"] for p in parts]).gather(1, count[:, None])[:, 0]
    true_cag = torch.where(maj, torch.zeros((), dtype=cag.dtype), cag)
    return [Sample(p["h_prompt"], p["h_resp"], p["prompt_feat"], p["len_norm"], p["minority"],
                   p["admissible"], p["cag"], c, int(m), n, float(tc))
            for p, c, m, n, tc in zip(parts, correct.unbind(0), maj.tolist(), count.tolist(),
                                      true_cag.tolist(), strict=True)]
