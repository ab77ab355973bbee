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


def stack(samples: list[Sample], out: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Batch samples: tensor fields stacked on dim 0, int/float fields as int64/float32 [N].

    ``out``: per field a contiguous [N, ...] tensor of :func:`stacked_layout`'s dtype and shape,
    on the samples' device, to stack into (one write instead of a stacked temporary and a copy);
    returned as the batch."""
    batch = {}
    for f in fields(Sample):
        vals = [getattr(s, f.name) for s in samples]
        if isinstance(vals[0], Tensor):
            batch[f.name] = (torch.stack(vals) if out is None
                             else torch.stack(vals, out=out[f.name]))
        else:
            t = torch.tensor(vals, dtype=torch.float32 if f.name == "true_cag" else torch.long)
            batch[f.name] = t if out is None else out[f.name].copy_(t)
    return batch


def stacked_layout(samples: list[Sample]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Per field, the dtype and the per-sample shape :func:`stack` gives these samples (tensor
    fields: their promoted dtype and the first sample's shape; stack refuses unequal shapes)."""
    layout = {}
    for f in fields(Sample):
        vals = [getattr(s, f.name) for s in samples]
        if isinstance(vals[0], Tensor):
            dtype = vals[0].dtype
            for other in {v.dtype for v in vals[1:]} - {dtype}:  # promote over the distinct ones
                dtype = torch.promote_types(dtype, other)
            layout[f.name] = (dtype, tuple(vals[0].shape))
        else:
            layout[f.name] = (torch.float32 if f.name == "true_cag" else torch.long, ())
    return layout


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
