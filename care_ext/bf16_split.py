"""Float32 first-layer weights as sums of bfloat16 pieces, for tensor-core GEMMs on bf16 inputs.

The hidden states reach the acquisition step as bfloat16. A product of two bf16 numbers is exact
in float32 (8-bit x 8-bit significands), so with a float32 weight written as
``w = hi + mid + lo`` (each piece bf16, each the rounding of what the previous ones left)

    x @ w  =  x @ hi + x @ mid + x @ lo

is three bf16 GEMMs with float32 accumulation, products exact: the result differs from a float32
GEMM only by the order of the float32 sums and by the weight's rounding to the pieces: each piece
rounds to nearest, leaving at most 2^-8 of what it was given, so three pieces leave at most
2^-24 |w| (float32's own rounding) and two leave 2^-16 |w|. On an H100/H200 a bf16 tensor-core GEMM runs at ~15x the
float32 rate, so three of them are ~5x faster than one float32 GEMM: at 1024x64x4096 the first
layers are 69 GFLOP in float32, the step's whole cost. This module builds the pieces once per
weight version (the caller caches them with the folded weights); the fused step
(``torch.ops.care_ext._acquisition_step_fused_split(..., first_layer_split)``) consumes them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

TERMS = 3
"""Default pieces per weight: 3 reproduces float32 weights to within float32 rounding (2^-24
relative); 2 leaves up to 2^-16 relative, a third less tensor-core work."""


def split_bf16(w: Tensor, terms: int = TERMS) -> Tensor:
    """Split a float32 tensor into ``terms`` bfloat16 pieces whose float32 sum approximates it.

    Args:
        w: float32, any shape, finite.
        terms: 1..3.

    Returns:
        bfloat16 [terms, *w.shape]: piece 0 = bf16(w), piece t = bf16(w - sum of pieces < t)
        (round to nearest even). ``split_bf16(w).float().sum(0)`` equals ``w`` to 2^-24 relative
        for 3 pieces, 2^-16 for 2, 2^-8 for 1 (bf16 has float32's exponent range, so no piece
        overflows; pieces of weights below ~2^-110 lose bits to bf16's subnormals).

    Raises:
        ValueError: non-float32 input, terms outside 1..3, or non-finite values.
    """
    if w.dtype != torch.float32:
        raise ValueError(f"split_bf16 takes float32 weights, got {w.dtype}")
    if not 1 <= terms <= 3:
        raise ValueError(f"terms must be 1, 2 or 3, got {terms}")
    if w.numel() > 0:  # min and max carry any NaN or Inf (a pass without a bool temporary)
        lo, hi = torch.aminmax(w.detach())
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            raise ValueError("split_bf16: the weights hold NaN or Inf")
    # in place on one float32 remainder: the core splits its first layers after every update, and
    # allocating a new tensor per operation cost 3x the arithmetic (on the CPU, 384 x 4096: 5.9 ms
    # with temporaries, 1.8 ms in place, the isfinite check 2.0 ms more; bench/RESULTS.md)
    out = torch.empty((terms, *w.shape), dtype=torch.bfloat16, device=w.device)
    rest = w.detach().clone()
    for t in range(terms):
        out[t].copy_(rest)  # round to nearest even
        if t + 1 < terms:
            rest.sub_(out[t])  # exact: what the piece left, in float32
    return out


def first_layer_split(stage1: Sequence[Tensor], stage2: Sequence[Tensor], hidden_size: int,
                      terms: int = TERMS) -> list[Tensor]:
    """The ``first_layer_split`` argument of the fused step for two folded classifiers.

    Args:
        stage1, stage2: the 10 folded float32 weights of each classifier
            (:data:`care_ext.reference.CLASSIFIER_WEIGHT_NAMES` order: prompt_w [P, H + Fp],
            resp1_w [R1, H + Fr], ...).
        hidden_size: H (the first H columns of prompt_w and resp1_w are the hidden-state ones).
        terms: bf16 pieces per weight (1..3).

    Returns:
        [rollout bf16 [terms, R1_1 + R1_2, H], prompt bf16 [terms, P_1 + P_2, H]]: both stages'
        hidden columns stacked (Stage-I's units first) and split with :func:`split_bf16`.
    """
    H = int(hidden_size)
    for name, w in (("stage1", stage1), ("stage2", stage2)):
        if len(w) != 10:
            raise ValueError(f"{name} must hold 10 folded weights, got {len(w)}")
        for i in (0, 2):
            if w[i].dim() != 2 or w[i].shape[1] < H:
                raise ValueError(f"{name}[{i}] must be [units, H + features] with H = {H}, "
                                 f"got {tuple(w[i].shape)}")
    rollout = torch.cat([stage1[2][:, :H], stage2[2][:, :H]])
    prompt = torch.cat([stage1[0][:, :H], stage2[0][:, :H]])
    return [split_bf16(rollout, terms).contiguous(), split_bf16(prompt, terms).contiguous()]
