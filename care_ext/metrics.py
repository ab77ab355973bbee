"""Per-step monitors (§6). Deployable ones never read unbought gold; ``sim/*`` ones do and are
computed only with a simulation oracle.

Deployable (``care/*``, ``budget/*``, ``audit/*``): majority ratio, valid ratio, answer entropy,
zero-std fraction of the kept prompts' rewards, mean length, the share of each source, classifier
scores, labels and cost spent, and pseudo-label accuracy estimated on the random audit slice
(unbiased because the slice is uniform over the batch's fresh prompts).
Simulation-only (``sim/*``): true pseudo-label accuracy, reward accuracy of the kept rollouts,
trust precision/recall, CAG recall of the bought set, wrong-majority share of the bought set.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .strategies.base import cluster_entropy, top_rows

from .decision import BOUGHT, CACHED, DROPPED, TRUSTED


def _mean(x: Tensor) -> float:
    return float(x.float().mean()) if x.numel() else float("nan")


def deployable(source: Tensor, rewards: Tensor, weight: Tensor, sizes: Tensor,
               lengths: Tensor | None, reliability: Tensor | None, ecag: Tensor | None
               ) -> dict[str, float]:
    """Monitors from what the host gave and what was decided (no gold of unbought prompts).

    Args: source int8 [B]; rewards float32 [B, G]; weight float32 [B]; sizes int64 [B, G];
    lengths [N, G] or None; reliability / ecag float32 [N] or None: the N rows whose features
    are finite (rows dropped for non-finite features are left out of these means).
    """
    B, G = sizes.shape
    kept = source != DROPPED
    m = {
        "care/majority_ratio": _mean(sizes[:, 0].double() / G),
        "care/valid_ratio": _mean(sizes.sum(1).double() / G),
        "care/answer_entropy": _mean(cluster_entropy(sizes)),
        "care/zero_std_frac": _mean((rewards[kept] == rewards[kept][:, :1]).all(1)),
        "care/frac_trusted": _mean(source == TRUSTED),
        "care/frac_bought": _mean(source == BOUGHT),
        "care/frac_cached": _mean(source == CACHED),
        "care/frac_dropped": _mean(source == DROPPED),
        "care/weight_mean_kept": _mean(weight[kept]),
    }
    if lengths is not None:
        m["care/length_mean"] = _mean(lengths.double())
    if reliability is not None:
        m["care/reliability_mean"] = _mean(reliability)
    if ecag is not None:
        m["care/ecag_mean"] = _mean(ecag)
    return {k: v for k, v in m.items() if v == v}  # an empty selection logs nothing, not NaN


def cag_recall(true_cag: Tensor, eligible: Tensor, bought: Tensor, ties: str = "credit") -> float:
    """Share of the k = ``bought.sum()`` bought rows that an Oracle buying the k ``eligible`` rows
    of highest ``true_cag`` (NaN: never) would have bought too; NaN when nothing was bought.

    Args:
        true_cag: float [B]. eligible, bought: bool [B] (bought rows are eligible ones).
        ties: rows tied at the Oracle's k-th value: 'credit' counts bought tied rows as the
            Oracle's up to the places its top k has left for the tie (invariant to row order),
            'index' takes the Oracle's tied rows in row order (:func:`top_rows`).
    """
    if ties not in ("credit", "index"):
        raise ValueError(f"ties must be 'credit' or 'index', got {ties!r}")
    k = int(bought.sum())
    if k == 0:
        return float("nan")
    if ties == "index":
        return float((top_rows(true_cag, eligible, k) & bought).sum()) / k
    v = true_cag.double()
    el = eligible & ~torch.isnan(v)
    if int(el.sum()) <= k:  # the Oracle buys every eligible row
        return float((bought & el).sum()) / k
    kth = torch.sort(v[el], descending=True).values[k - 1]
    above = el & (v > kth)
    tied = bought & el & (v == kth)
    credit = int((bought & above).sum()) + min(int(tied.sum()), k - int(above.sum()))
    return credit / k


def simulation(source: Tensor, rewards: Tensor, true_rewards: Tensor, majority_correct: Tensor,
               true_cag: Tensor, fresh: Tensor, bought_by_strategy: Tensor,
               cag_recall_ties: str = "credit") -> dict[str, float]:
    """``sim/*`` monitors; every argument [B] or [B, G] on the CPU.

    ``bought_by_strategy`` excludes the audit slice, so CAG recall measures the strategy;
    ``cag_recall_ties``: :func:`cag_recall`'s ``ties`` (CareConfig.sim_cag_recall_ties).
    """
    kept = source != DROPPED
    trusted = source == TRUSTED
    bought = source == BOUGHT
    m = {"sim/label_acc": _mean(majority_correct),
         "sim/reward_acc": _mean(rewards[kept] == true_rewards[kept])}
    if trusted.any():
        m["sim/trust_precision"] = _mean(majority_correct[trusted])
    good = majority_correct & fresh
    if good.any():
        m["sim/trust_recall"] = _mean(trusted[good])
    if bought_by_strategy.any():
        m["sim/cag_recall"] = cag_recall(true_cag, fresh, bought_by_strategy, cag_recall_ties)
    if bought.any():
        m["sim/bought_wrong_majority"] = _mean(~majority_correct[bought])
    return m
