"""Rows of one batch grouped by prompt uid (``CareConfig.repeated_uids='share'``).

A uid may fill several rows of a batch: several rollout groups of one prompt (OpenRLHF's
``--data.prompt_probs`` blending repeats rows of the smaller datasets). Each row is decided on
its own rollouts, but a purchase is per uid: the controller picks one row of a uid to buy
through (:meth:`UidGroups.first_in_order`), asks the oracle once, and spreads the outcome to
every row of the uid (:meth:`UidGroups.spread`). On a batch of distinct uids every method is the
identity, so such a batch is decided exactly as before repeats were allowed.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


class UidGroups:
    """The rows of each uid of a batch.

    Attributes:
        rep: int64 [B]: the first row of each row's uid (``rep[i] == i`` on distinct uids).
        first: dict uid -> its first row.
        repeated: whether some uid fills more than one row.
    """

    def __init__(self, uids: Sequence[str]) -> None:
        self.first: dict[str, int] = {}
        rep = []
        for i, u in enumerate(uids):
            rep.append(self.first.setdefault(u, i))
        self.rep = torch.tensor(rep, dtype=torch.long)
        self.repeated = len(self.first) < len(rep)

    @property
    def n_unique(self) -> int:
        """U, the number of distinct uids."""
        return len(self.first)

    def spread(self, rows: Tensor) -> Tensor:
        """bool [B]: the rows whose uid has a row in ``rows`` (bool [B])."""
        if not self.repeated:
            return rows.clone()
        hit = torch.zeros_like(rows)
        hit[self.rep[rows]] = True
        return hit[self.rep]

    def spread_rows(self, rows: Iterable[int]) -> list[int]:
        """Every row of the uids of ``rows`` (row indices), ascending."""
        rows = list(rows)
        if not self.repeated or not rows:
            return sorted(rows)
        mask = torch.zeros(len(self.rep), dtype=torch.bool)
        mask[torch.tensor(rows, dtype=torch.long)] = True
        return self.spread(mask).nonzero().flatten().tolist()

    def first_in_order(self, order: Tensor) -> Tensor:
        """The entries of ``order`` (int64 row indices) whose uid has no earlier entry: one row
        per uid, each uid at the place of its first row in ``order``."""
        if not self.repeated or len(order) == 0:
            return order
        rep = self.rep.tolist()  # a uid is known by its first row
        seen: set[int] = set()
        keep = []
        for i in order.tolist():
            if rep[i] not in seen:
                seen.add(rep[i])
                keep.append(i)
        return torch.tensor(keep, dtype=torch.long)
