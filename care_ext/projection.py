"""Hidden states reduced where they are produced: the classifiers' first layer, applied early.

Both CARE classifiers start with a Linear over ``[h ; features]`` (BatchNorm folded in, see
:meth:`care_ext.classifiers.CareClassifier.fold`), and most of the acquisition step's
multiply-adds (~85% at CARE's dims, 64×8×4096: 168 of ~195 M per classifier) are the
hidden-state part of those two products: ``h_prompt @ prompt_w[:, :H]^T`` and
``h_resp @ resp1_w[:, :H]^T`` for Stage-I and Stage-II. A host whose hidden states live on other
machines (OpenRLHF's policy workers, on GPUs) can apply that part there and ship
``2P + 2R1`` floats per sample instead of ``2H`` (384 instead of 8192 at CARE's sizes and
H = 4096); the controller then runs the rest of the step on the small vectors:

1. ``proj = controller.first_layer_projection()`` - the current weights (None until the
   classifiers exist: the first step ships raw hidden states);
2. the host computes ``p_prompt, p_resp = proj.apply(h_prompt, h_resp)`` next to the model;
3. ``controller.decide(..., projected=ProjectedHidden(p_prompt, p_resp, proj.version, fetch_raw))``
   where ``fetch_raw(rows)`` returns the raw hidden states of the prompts the classifiers will be
   trained on (bought, cached, waiting for an asynchronous label): about the label budget's share.

Exactness: the reduced step runs the unchanged ops with :func:`reduced_weights` - an identity
block over the projected columns (``x * 1`` and ``+ x * 0`` are exact in float32), the feature
columns and biases as they are. Only the float32 summation order of the first layer moves (the
hidden part is summed on its own, then the features are added), so scores agree with the raw
path to float32 rounding, like the CPU and CUDA kernels do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

FetchRaw = Callable[[Sequence[int]], "tuple[Tensor, Tensor]"]


@dataclass(frozen=True)
class FirstLayerProjection:
    """The hidden-state columns of both classifiers' first layers at one controller step.

    Attributes:
        prompt_w: float32 [P1 + P2, H]: Stage-I's then Stage-II's folded ``prompt_w[:, :H]``.
        resp_w: float32 [R1a + R1b, H]: Stage-I's then Stage-II's folded ``resp1_w[:, :H]``.
        prompt_split: (P1, P2); resp_split: (R1a, R1b).
        version: the controller step these weights serve (``decide`` checks it: weights change
            at every ``update``).
    """

    prompt_w: Tensor
    resp_w: Tensor
    prompt_split: tuple[int, int]
    resp_split: tuple[int, int]
    version: int

    @property
    def hidden_size(self) -> int:
        return int(self.prompt_w.shape[1])

    def to(self, device) -> "FirstLayerProjection":
        """The same projection with its weights on ``device`` (e.g. the worker's GPU)."""
        return FirstLayerProjection(self.prompt_w.to(device), self.resp_w.to(device),
                                    self.prompt_split, self.resp_split, self.version)

    def apply(self, h_prompt: Tensor, h_resp: Tensor) -> tuple[Tensor, Tensor]:
        """Project hidden states (on their own device, in float32).

        Args:
            h_prompt: [..., H] final-norm states at the last prompt token (any float dtype).
            h_resp: [..., H] at the last response token (e.g. [B, H] per sample or [B, G, H]).

        Returns:
            ``(p_prompt [..., P1 + P2], p_resp [..., R1a + R1b])``, float32, same device as the
            inputs. Plain float32 products: with TF32 matmuls enabled on a GPU
            (``torch.backends.cuda.matmul.allow_tf32``) they are TF32 products instead.
        """
        H = self.hidden_size
        for name, h in (("h_prompt", h_prompt), ("h_resp", h_resp)):
            if h.shape[-1] != H:
                raise ValueError(f"{name} has {h.shape[-1]} columns, the projection was built for H = {H}")
            if not h.is_floating_point():
                raise ValueError(f"{name} must be a float tensor, got {h.dtype}")
        wp = self.prompt_w.to(h_prompt.device)
        wr = self.resp_w.to(h_resp.device)
        return h_prompt.float() @ wp.T, h_resp.float() @ wr.T


@dataclass
class ProjectedHidden:
    """One step's hidden states as :meth:`FirstLayerProjection.apply` reduced them.

    Attributes:
        prompt: float32 [B, P1 + P2] (row b: prompt b). resp: float32 [B, G, R1a + R1b].
        version: the :attr:`FirstLayerProjection.version` they were made with.
        fetch_raw: ``fn(rows) -> (h_prompt [n, H], h_resp [n, G, H])``: the raw hidden states of
            prompts ``rows`` (a sorted list of batch rows), float32/bf16/fp16 on any device. Called
            at most once per ``decide``, for the rows the classifiers will train on.
    """

    prompt: Tensor
    resp: Tensor
    version: int
    fetch_raw: FetchRaw


def first_layer_projection(w1: Sequence[Tensor], w2: Sequence[Tensor], hidden_size: int,
                           version: int) -> FirstLayerProjection:
    """Build the projection from the folded weights of Stage-I (``w1``) and Stage-II (``w2``)
    (10 tensors each, :data:`care_ext.reference.CLASSIFIER_WEIGHT_NAMES` order)."""
    H = int(hidden_size)
    p1, p2 = w1[0][:, :H], w2[0][:, :H]
    r1, r2 = w1[2][:, :H], w2[2][:, :H]
    return FirstLayerProjection(torch.cat([p1, p2]).float().contiguous(),
                                torch.cat([r1, r2]).float().contiguous(),
                                (int(p1.shape[0]), int(p2.shape[0])),
                                (int(r1.shape[0]), int(r2.shape[0])), int(version))


def padded_width(prompt_split: tuple[int, int], resp_split: tuple[int, int]) -> int:
    """W = max(P1 + P2, R1a + R1b): the ops take one hidden width for prompts and rollouts, so
    the controller zero-pads the narrower projection to W columns (:func:`pad_columns`)."""
    return max(sum(prompt_split), sum(resp_split))


def pad_columns(x: Tensor, width: int) -> Tensor:
    """``x`` [..., w] with zero columns appended up to ``width`` (``x`` itself when w == width)."""
    if x.shape[-1] == width:
        return x
    return torch.cat([x, x.new_zeros(*x.shape[:-1], width - x.shape[-1])], dim=-1)


def reduced_weights(w: Sequence[Tensor], hidden_size: int, which: int, prompt_split: tuple[int, int],
                    resp_split: tuple[int, int]) -> list[Tensor]:
    """Folded weights of one classifier rewritten for projected inputs.

    Args:
        w: the classifier's 10 folded tensors (input columns: H hidden, then features).
        hidden_size: H of ``w``. which: 0 = Stage-I (first block of the projection), 1 = Stage-II.
        prompt_split, resp_split: the projection's block sizes.

    Returns:
        10 tensors where ``prompt_w`` is [P, W + Fp] and ``resp1_w`` [R1, W + Fr]
        (W = :func:`padded_width`): an identity on this classifier's block of projected columns,
        zeros on the other block and on the padding, then the original feature columns; every
        other tensor unchanged. Inputs: the projections padded to W columns.
    """
    H, W = int(hidden_size), padded_width(prompt_split, resp_split)
    out = list(w)
    for slot, split in ((0, prompt_split), (2, resp_split)):
        full = w[slot]
        rows = full.shape[0]
        if rows != split[which]:
            raise ValueError(f"classifier weight {slot} has {rows} rows, the projection block has {split[which]}")
        red = full.new_zeros(rows, W + full.shape[1] - H)
        start = 0 if which == 0 else split[0]
        red[:, start:start + rows] = torch.eye(rows, dtype=full.dtype, device=full.device)
        red[:, W:] = full[:, H:]
        out[slot] = red.contiguous()
    return out
