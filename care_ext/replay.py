"""Labelled training samples and the FIFO replay buffers of the classifiers (§5).

A :class:`Sample` is one prompt whose gold label is known: its features at the step it was
labelled and the labels derived from the gold. Both stages' buffers hold references to the same
sample objects, so a sample costs its memory once.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class Sample:
    """One labelled prompt (G rollouts, hidden size H). Tensors live on the CPU.

    h_prompt [H] and h_resp [G, H] keep the host's dtype (fp32 or bf16); prompt_feat float32
    [1+G]; len_norm float32 [G]; minority bool [G] (valid, outside the majority); admissible bool
    [G+1]; cag float32 [G+1] (class-wise CAG); correct bool [G] (rollout matches the gold);
    majority_correct int (Stage-I label); count int (Stage-II label: correct rollouts outside a
    wrong majority, 0 if the majority is right); true_cag float (0 if the majority is right, else
    cag[count]; the regression target).
    """

    h_prompt: Tensor
    h_resp: Tensor
    prompt_feat: Tensor
    len_norm: Tensor
    minority: Tensor
    admissible: Tensor
    cag: Tensor
    correct: Tensor
    majority_correct: int
    count: int
    true_cag: float

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def stack(samples: list[Sample]) -> dict[str, Tensor]:
    """Batch samples: tensor fields stacked on dim 0, int/float fields as int64/float32 [N]."""
    out = {}
    for f in fields(Sample):
        vals = [getattr(s, f.name) for s in samples]
        if isinstance(vals[0], Tensor):
            out[f.name] = torch.stack(vals)
        else:
            out[f.name] = torch.tensor(vals, dtype=torch.float32 if f.name == "true_cag" else torch.long)
    return out


class ReplayBuffer:
    """FIFO buffer of samples with uniform or label-stratified draws.

    Args:
        capacity: oldest samples fall out beyond it (0 = keep nothing).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: deque[Sample] = deque(maxlen=max(capacity, 0))

    def __len__(self) -> int:
        return len(self.items)

    def extend(self, samples: list[Sample]) -> None:
        if self.capacity > 0:
            self.items.extend(samples)

    def sample(self, n: int, gen: torch.Generator) -> list[Sample]:
        """Up to n samples, uniformly without replacement."""
        n = min(n, len(self.items))
        if n <= 0:
            return []
        idx = torch.randperm(len(self.items), generator=gen)[:n].tolist()
        return [self.items[i] for i in idx]

    def sample_stratified(self, n: int, gen: torch.Generator, key: str = "count") -> list[Sample]:
        """Up to n samples stratified by ``getattr(sample, key)``: n // #labels from each label
        (ascending label order, fewer if a label has fewer), the rest uniformly from what is left."""
        n = min(n, len(self.items))
        if n <= 0:
            return []
        by_label: dict[int, list[int]] = {}
        for i, s in enumerate(self.items):
            by_label.setdefault(int(getattr(s, key)), []).append(i)
        per = n // len(by_label)
        chosen: list[int] = []
        for label in sorted(by_label):
            idx = by_label[label]
            perm = torch.randperm(len(idx), generator=gen)[:per].tolist()
            chosen.extend(idx[j] for j in perm)
        rest = sorted(set(range(len(self.items))) - set(chosen))
        if len(chosen) < n and rest:
            perm = torch.randperm(len(rest), generator=gen)[: n - len(chosen)].tolist()
            chosen.extend(rest[j] for j in perm)
        return [self.items[i] for i in chosen]
