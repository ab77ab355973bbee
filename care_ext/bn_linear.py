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

When every block is x̂ (the 'fused' route), the forward and the backward are one op each
(:func:`care_ext.ops.bn_linear_forward` / :func:`care_ext.ops.bn_linear_backward`; on the CPU the
private ops ``care_ext::_bn_linear_forward`` / ``_bn_linear_backward``). Where the CPU step
multiplies on care_ext's AVX2 GEMM (:func:`care_ext.ops.cpu_step_packs_weights`: x86 without
AVX-512F at widths >= 1024, or ``CARE_EXT_CPU_GEMM``), the forward's first block and the
backward's g^T x̂ multiply on that GEMM, and the backward finishes the four gradients in its pass
over each 16-column panel. On a 2-core Zen 3 the backward took 0.35-0.83x the ATen ops' time at
the classifiers' shapes on 2 threads (0.65-0.93x on 1) and the CARE core's update 0.89-0.97x
at 64x8x4096 and 0.91-0.94x at 512x16x4096 (0.96x at 64x8x4096 on 1 thread;
bench/bench_bn_linear.py; bench/RESULTS.md, twentieth session). Elsewhere the ops run the same
ATen calls as before, with the same bits.

On the CPU, bf16 hidden states can skip x̂ altogether (``split``; :func:`resolve_first_layer_split`
says where): with mean and rstd = 1/sqrt(var + eps) of the batch,

    x̂ (W diag(gamma))^T = x (W diag(gamma rstd))^T - (mean rstd)^T (W diag(gamma))^T
    M = g^T x̂          = (g^T x - (1^T g)^T mean^T) diag(rstd)

and both GEMMs multiply the bf16 x by bf16 pieces of a float32 operand (3 pieces: float32-exact),
so MKL's bf16 GEMM (AMX) runs them with exact products and float32 sums, and neither the float32
copy of the states nor x̂ is formed (at 512x16x4096 the update took 30% less time).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops, reference

BACKWARDS = ("auto", "autograd", "fused", "split")
FUSED_MIN_WIDTH = 1024
"""``first_layer_backward='auto'`` fuses when the first layer's input width (H + features) is at
least this: at LLM widths the saved GEMM is a third of the update's GEMM work; below it the saving
is noise and autograd's float order (with which the lab's recorded numbers were made) is kept."""
SPLIT_TERMS = 3
"""bf16 pieces per float32 operand on the split route: float32-exact weights and gradients."""
SPLIT_MIN_ROWS_PER_OUTPUT = 4
"""The split route runs for batches of at least this many rows per output unit of the layer: its
three bf16 products per value, the weight's split and MKL's packing of the pieces lose to one
float32 GEMM on small batches. On a 2-core AMX Xeon (H = 4096) the 64x8x4096 update took 13%
longer with 1 row per output, 1-2% with 2, the same with 4 as without the route (bench/RESULTS.md,
twelfth session); a loop of bn_linear alone had put the break-even lower, at 64-256 rows."""
SPLIT_MAX_MEAN_RATIO = 8.0
"""A column whose batch |mean| exceeds this many standard deviations leaves the split GEMMs (which
subtract the mean after multiplying, losing ~log2(ratio) bits to cancellation) for a normalised
float32 copy of its own: LLM hidden states have a few such "massive activation" channels."""


def resolve_first_layer_backward(mode: str, in_features: int) -> bool:
    """Whether a first layer of input width ``in_features`` uses the fused backward.

    Args:
        mode: 'fused' (always), 'split' (always: the fused backward, its GEMMs on bf16 pieces
            where :func:`resolve_first_layer_split` says so), 'autograd' (never: BatchNorm and
            Linear as separate autograd ops, the float order of earlier releases) or 'auto'
            (fused iff in_features >= :data:`FUSED_MIN_WIDTH`).

    Raises:
        ValueError: unknown mode.
    """
    if mode not in BACKWARDS:
        raise ValueError(f"first_layer_backward must be one of {BACKWARDS}, got {mode!r}")
    return mode in ("fused", "split") or (mode == "auto" and in_features >= FUSED_MIN_WIDTH)


def resolve_first_layer_split(mode: str, in_features: int) -> bool:
    """Whether a first layer of input width ``in_features`` trains on split-bf16 GEMMs (bf16
    inputs on the CPU only; :func:`bn_linear`'s ``split``).

    'split': always; 'auto': at widths >= :data:`FUSED_MIN_WIDTH` on a CPU that multiplies bf16
    in hardware (:func:`care_ext.bf16_split.cpu_bf16_hardware`, which also needs the native
    library); 'fused' / 'autograd': never.

    Raises:
        ValueError: unknown mode.
    """
    resolve_first_layer_backward(mode, in_features)
    if mode == "auto" and in_features >= FUSED_MIN_WIDTH:
        from .bf16_split import cpu_bf16_hardware
        return cpu_bf16_hardware()
    return mode == "split"


def _split(t: Tensor) -> Tensor | None:
    """``t`` (float32 [R, C], any strides) as SPLIT_TERMS bf16 pieces [T * R, C]
    (:func:`care_ext.bf16_split.split_bf16`: one pass of ``care_ext::_split_bf16``), or None when
    it has non-finite values, which bf16 pieces cannot carry and the split refuses: the caller
    then takes the float32 route, whose NaN/Inf reach the trainer's finite checks as before."""
    from .bf16_split import split_bf16
    try:
        pieces = split_bf16(t, SPLIT_TERMS)
    except ValueError as e:  # TORCH_CHECK_VALUE in the op: NaN, Inf or beyond bf16's range
        if "NaN or Inf" not in str(e):
            raise
        return None
    return pieces.view(SPLIT_TERMS * t.shape[0], t.shape[1])


class _BNLinear(torch.autograd.Function):
    """Function behind :func:`bn_linear`. ``kinds`` names each column block's tensors: 'xhat'
    (one: x̂, computed outside) or 'raw' (five: bf16 x, its batch mean and 1/sqrt(var + eps),
    the indices of its columns with a large mean (int64 [k]) and their x̂ [N, k]). A raw block is
    never normalised: x̂ = (x - mean) * rstd enters the GEMMs as
    x (W diag(gamma * rstd))^T - mean^T diag(rstd) (W diag(gamma))^T, the weight split into bf16
    pieces so that MKL's bf16 GEMM multiplies exactly; the backward's g^T x likewise, with g
    split. The large-mean columns take their x̂ instead, in both directions."""

    @staticmethod
    def forward(ctx, weight: Tensor, bias: Tensor, gamma: Tensor, beta: Tensor, kinds: tuple,
                *blocks: Tensor) -> Tensor:
        ctx.kinds = kinds
        ctx.save_for_backward(weight, gamma, beta, *blocks)
        if all(k == "xhat" for k in kinds):  # one op (native on the CPU)
            return ops.bn_linear_forward(blocks, weight, bias, gamma, beta)
        out = torch.addmv(bias, weight, beta)[None, :]  # [1, O]: broadcast into the first block
        c, i, units = 0, 0, weight.shape[0]
        for kind in kinds:
            if kind == "xhat":
                xb = blocks[i]
                d = xb.shape[1]
                out = torch.addmm(out, xb, (weight[:, c:c + d] * gamma[c:c + d]).t())
                i += 1
            else:
                x, mean, rstd, big, xhat_big = blocks[i:i + 5]
                d = x.shape[1]
                wg = weight[:, c:c + d] * gamma[c:c + d]
                a = wg * rstd  # W diag(gamma * rstd)
                if big.numel():
                    a[:, big] = 0.0  # the large-mean columns: from their x̂ below
                pieces = _split(a)
                if pieces is None:
                    xb = (x.float() - mean) * rstd
                    out = torch.addmm(out, xb, wg.t())
                else:
                    prod = torch.ops.care_ext._bf16_mm(x, pieces.t())  # [N, T * O]
                    terms = prod.view(x.shape[0], SPLIT_TERMS, units).sum(1)
                    out = (out - a @ mean) + terms
                    if big.numel():
                        out.addmm_(xhat_big, wg[:, big].t())
                i += 5
            c += d
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        weight, gamma, beta, *blocks = ctx.saved_tensors
        if all(k == "xhat" for k in ctx.kinds):  # one op (native on the CPU)
            return ops.bn_linear_backward(g, blocks, weight, gamma, beta) + (None,) * (
                1 + len(blocks))
        g = g.contiguous()
        gsum = g.sum(0)
        units, ms, i = g.shape[1], [], 0
        g_pieces = None
        for kind in ctx.kinds:
            if kind == "xhat":
                ms.append(g.t().mm(blocks[i]))
                i += 1
                continue
            x, mean, rstd, big, xhat_big = blocks[i:i + 5]
            i += 5
            if g_pieces is None:
                g_pieces = _split(g.t())
            if g_pieces is None:
                ms.append(g.t().mm((x.float() - mean) * rstd))
                continue
            # (x^T g)^T: MKL ran this orientation 1.4-2.8x faster than g^T x (2-core AMX Xeon,
            # [1904, 4096] / [240, 4096] states, 192 split gradient columns)
            gx = torch.ops.care_ext._bf16_mm(x.t(), g_pieces.t())
            gx = gx.view(x.shape[1], SPLIT_TERMS, units).sum(1).t()
            gx.sub_(torch.outer(gsum, mean)).mul_(rstd)  # g^T x̂, x̂ never formed
            if big.numel():
                gx[:, big] = g.t().mm(xhat_big)
            ms.append(gx)
        return reference.bn_linear_grads(ms, gsum, weight, gamma, beta) + (None,) * (
            1 + len(blocks))


def bn_linear(bn: nn.BatchNorm1d, lin: nn.Linear, parts: list[Tensor], split: bool = False
              ) -> Tensor:
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
        split: bf16 blocks on the CPU (with the native library) skip the normalised copy: their
            batch statistics come from one pass over the bf16 values
            (``care_ext::_column_stats``: shifted sums, float64 across 16-row float32 ones), and
            the forward's and the backward's GEMMs multiply the bf16 values by
            :data:`SPLIT_TERMS` bf16 pieces of the float32 weights / output gradients
            (``care_ext::_bf16_mm``: MKL's bf16 GEMM, AMX where the CPU has it). Every product
            is exact and the sums float32; the mean is subtracted after the GEMM, which
            costs a column ~log2(|mean| / std) bits to cancellation, so columns beyond
            :data:`SPLIT_MAX_MEAN_RATIO` standard deviations take a normalised float32 copy of
            their own. Other blocks, and batches of fewer than 2 or than
            :data:`SPLIT_MIN_ROWS_PER_OUTPUT` x O rows, take the normalised copy.

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
    blocks, kinds, c = [], [], 0
    train = n >= 2
    split = split and n >= max(2, SPLIT_MIN_ROWS_PER_OUTPUT * lin.out_features)
    with torch.no_grad():
        if train:
            bn.num_batches_tracked.add_(1)
        m = 0.0  # no update without batch statistics
        if train:  # momentum None: the cumulative average, as nn.BatchNorm1d
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        for p, d in zip(parts, widths):
            if split and _splittable(p):
                mean, var = torch.ops.care_ext._column_stats(p)
                rm, rv = bn.running_mean[c:c + d], bn.running_var[c:c + d]
                rm.mul_(1.0 - m).add_(mean, alpha=m)  # as ATen's BatchNorm: unbiased variance
                rv.mul_(1.0 - m).add_(var, alpha=m * n / (n - 1))
                rstd = torch.rsqrt(var + bn.eps)
                big = ((mean.abs() * rstd) > SPLIT_MAX_MEAN_RATIO).nonzero().flatten()
                xhat_big = (p[:, big].float() - mean[big]) * rstd[big]
                blocks += [p, mean, rstd, big, xhat_big]
                kinds.append("raw")
            else:
                # ATen's BatchNorm without affine: x̂, and the running statistics updated in place
                # (on views of the module's buffers) exactly as nn.BatchNorm1d updates them
                blocks.append(torch.native_batch_norm(
                    p.to(torch.float32), None, None, bn.running_mean[c:c + d],
                    bn.running_var[c:c + d], train, m, bn.eps)[0])
                kinds.append("xhat")
            c += d
    return _BNLinear.apply(lin.weight, lin.bias, bn.weight, bn.bias, tuple(kinds), *blocks)


def _splittable(p: Tensor) -> bool:
    """A block the split route takes: bf16, 2-D, on the CPU, with the native library loaded."""
    if p.dtype != torch.bfloat16 or p.device.type != "cpu" or p.dim() != 2:
        return False
    from .ops import native_available
    return native_available(p.device)
