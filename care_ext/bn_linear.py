"""Training-mode ``BatchNorm1d -> Linear`` on data inputs, with a backward of one GEMM.

The first layers of the CARE classifiers (prompt branch, rollout branch) normalise their inputs
with a trainable BatchNorm and feed them to a Linear layer. Their inputs are data (hidden states
and cluster/length features): nothing upstream needs a gradient. Autograd still forms the Linear's
input gradient ``g W`` ([N, D], as large as the forward GEMM) because BatchNorm's gamma and beta
need it, and then reduces it over the rows. With x̂ the normalised input and g the output gradient
[N, O], all four parameter gradients follow from one [O, N] x [N, D] GEMM ``M = g^T x̂``:

    grad_W     = M diag(gamma) + (1^T g)^T beta^T
    grad_b     = 1^T g
    grad_gamma = column sums of W ⊙ M
    grad_beta  = (1^T g) W

so the backward runs one GEMM of the forward's size instead of two (measured in bench/bench_step.py;
bench/RESULTS.md). The forward multiplies x̂ by W diag(gamma) and adds W beta + b, which never
materialises the BatchNorm output. Results equal ``linear(batch_norm(x))`` up to float32 summation
order, so the float bits of a training run move; :func:`resolve_first_layer_backward` keeps small
widths (the CPU lab, H = 128) on autograd's order.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

BACKWARDS = ("auto", "autograd", "fused")
FUSED_MIN_WIDTH = 1024
"""``first_layer_backward='auto'`` fuses when the first layer's input width (H + features) is at
least this: at LLM widths the saved GEMM is a third of the update's GEMM work; below it the saving
is noise and autograd's float order (with which the lab's recorded numbers were made) is kept."""


def resolve_first_layer_backward(mode: str, in_features: int) -> bool:
    """Whether a first layer of input width ``in_features`` uses the fused backward.

    Args:
        mode: 'fused' (always), 'autograd' (never: BatchNorm and Linear as separate autograd
            ops, the float order of earlier releases) or 'auto' (fused iff in_features >=
            :data:`FUSED_MIN_WIDTH`).

    Raises:
        ValueError: unknown mode.
    """
    if mode not in BACKWARDS:
        raise ValueError(f"first_layer_backward must be one of {BACKWARDS}, got {mode!r}")
    return mode == "fused" or (mode == "auto" and in_features >= FUSED_MIN_WIDTH)


class _BNLinear(torch.autograd.Function):
    """Function behind :func:`bn_linear` (inputs: x̂ blocks are computed outside, see there)."""

    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor, gamma: Tensor, beta: Tensor,
                *xhat: Tensor) -> Tensor:
        out, c = None, 0
        for xb in xhat:  # column blocks of x̂, each times its block of W diag(gamma)
            d = xb.shape[1]
            w = (weight[:, c:c + d] * gamma[c:c + d]).t()
            if out is None:
                out = torch.addmm(torch.addmv(bias, weight, beta), xb, w)
            else:
                out.addmm_(xb, w)
            c += d
        ctx.save_for_backward(weight, gamma, beta, *xhat)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        weight, gamma, beta, *xhat = ctx.saved_tensors
        g = g.contiguous()
        gsum = g.sum(0)
        m = torch.cat([g.t().mm(xb) for xb in xhat], dim=1) if len(xhat) > 1 else g.t().mm(xhat[0])
        grad_w = torch.mul(m, gamma).addr_(gsum, beta)
        grad_gamma = m.mul_(weight).sum(0)  # m is not needed any more: no second [O, D] buffer
        grad_beta = gsum @ weight
        return (grad_w, gsum, grad_gamma, grad_beta) + (None,) * len(xhat)


def bn_linear(bn: nn.BatchNorm1d, lin: nn.Linear, parts: list[Tensor]) -> Tensor:
    """``lin(bn(cat(parts, dim=1)))`` in training mode, with the one-GEMM backward above.

    Args:
        bn: BatchNorm1d over D = sum of the parts' widths (affine, tracking running statistics,
            in training mode). Its running statistics are updated exactly as nn.BatchNorm1d does
            (momentum, unbiased variance, ``num_batches_tracked``); with fewer than 2 rows it
            normalises with them instead and updates nothing (as ``classifiers._bn``).
        lin: Linear(D, O).
        parts: column blocks [N, D_i] of the input, any float dtype (a bf16 hidden-state block is
            read once, straight into the float32 normalised copy), no gradient required: the
            inputs get none.

    Returns:
        float32 [N, O]; gradients reach lin.weight, lin.bias, bn.weight and bn.bias.
    """
    if not bn.training:
        raise ValueError("bn_linear is the training path; evaluate with the module itself")
    if any(p.requires_grad for p in parts):
        raise ValueError("bn_linear gives its inputs no gradient; they must not require one")
    n = parts[0].shape[0]
    widths = [p.shape[1] for p in parts]
    if sum(widths) != bn.num_features or lin.in_features != bn.num_features:
        raise ValueError(f"parts are {widths} columns wide; BatchNorm has {bn.num_features}, "
                         f"Linear takes {lin.in_features}")
    xhat, c = [], 0
    train = n >= 2
    with torch.no_grad():
        if train:
            bn.num_batches_tracked.add_(1)
        m = 0.0  # no update without batch statistics
        if train:  # momentum None: the cumulative average, as nn.BatchNorm1d
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        for p, d in zip(parts, widths):
            # ATen's BatchNorm without affine: x̂, and the running statistics updated in place (on
            # views of the module's buffers) exactly as nn.BatchNorm1d updates them
            xhat.append(torch.native_batch_norm(
                p.to(torch.float32), None, None, bn.running_mean[c:c + d], bn.running_var[c:c + d],
                train, m, bn.eps)[0])
            c += d
    return _BNLinear.apply(lin.weight, lin.bias, bn.weight, bn.bias, *xhat)
