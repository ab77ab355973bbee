"""Pure-torch reference twin of every care_ext op: the fallback and the test oracle.

Each function here has the same name, arguments and semantics as ``torch.ops.care_ext.<name>``
(ARCHITECTURE.md §3). They are written for clarity, not speed, run on any device and in any
floating dtype (tests run them in float64 and compare the native kernels to them). The native
kernels share one per-row implementation (``csrc/group_math.h``); this file is deliberately
written differently (vectorised over the batch, explicit reward vectors) so that the two are
independent.

Conventions used throughout:
    B prompts, G rollouts per prompt (1 <= G <= MAX_GROUP_SIZE for the native kernels), H hidden size.
    Answer ids are int64; any negative id (canonically -1) means "no extractable answer".
    A row is "constant" when all G values are equal; its advantage is exactly 0 (std == 0).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

MAX_GROUP_SIZE = 64
"""Largest G the native kernels accept (they keep per-row scratch of this size)."""

CLASSIFIER_WEIGHT_NAMES = (
    "prompt_w", "prompt_b", "resp1_w", "resp1_b", "resp2_w", "resp2_b",
    "head1_w", "head1_b", "head2_w", "head2_b",
)
"""Order of the 10 folded weight tensors of one classifier (see :func:`classifier_forward`)."""


# ----------------------------------------------------------------------------------------------
# cluster statistics
# ----------------------------------------------------------------------------------------------
def cluster_stats(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Answer clusters of each prompt's G rollouts.

    Args:
        ids: int64 [B, G] answer ids; negative = invalid (no extractable answer).

    Returns:
        rank: int64 [B, G], the rank of response i's cluster (0 = majority), -1 if invalid.
        sizes: int64 [B, G], cluster sizes in rank order, zero-padded. Clusters are the sets of
            equal valid ids, ordered by size descending, ties broken by the smaller index of the
            cluster's first occurrence. Majority size = sizes[:, 0]; valid count = sizes.sum(1).
    """
    B, G = ids.shape
    valid = ids >= 0
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # [B,G,G]
    count = same.sum(-1)  # size of i's cluster
    idx = torch.arange(G, device=ids.device)
    # first occurrence of i's id: smallest j with same[b,i,j]
    first = torch.where(same, idx.view(1, 1, G), torch.full_like(same, G, dtype=torch.long)).amin(-1)
    is_rep = valid & (first == idx.view(1, G))
    # rank of a representative r = number of representatives q that sort before it
    cq, cr = count[:, None, :], count[:, :, None]  # [B, r, q]
    before = (cq > cr) | ((cq == cr) & (idx.view(1, 1, G) < idx.view(1, G, 1)))
    before &= is_rep[:, None, :]
    rep_rank = before.sum(-1)  # meaningful where is_rep
    rank = torch.gather(rep_rank, 1, first.clamp(max=G - 1))
    rank = torch.where(valid, rank, torch.full_like(rank, -1))
    sizes = torch.zeros(B, G, dtype=torch.long, device=ids.device)
    if B * G:
        slot = torch.where(is_rep, rep_rank, torch.full_like(rep_rank, G))  # G = discard slot
        padded = torch.zeros(B, G + 1, dtype=torch.long, device=ids.device)
        padded.scatter_(1, slot, torch.where(is_rep, count, torch.zeros_like(count)))
        sizes = padded[:, :G].contiguous()
    return rank, sizes


# ----------------------------------------------------------------------------------------------
# advantages and CAG
# ----------------------------------------------------------------------------------------------
def group_advantage(rewards: Tensor, eps: float, unbiased: bool) -> Tensor:
    """GRPO group advantage per prompt.

    Args:
        rewards: floating [B, G].
        eps: added to the std in the denominator.
        unbiased: sample std (divide by G-1) if True, population std (divide by G) if False.

    Returns:
        [B, G] of rewards' dtype: (r - mean) / (std + eps); a constant row (std == 0, which
        includes G == 1) is exactly 0.
    """
    if rewards.shape[1] < 2 or rewards.shape[0] == 0:
        return torch.zeros_like(rewards)
    constant = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, correction=1 if unbiased else 0)
    adv = (rewards - mean) / (std + eps)
    return torch.where(constant, torch.zeros_like(adv), adv)


def cag(r_gt: Tensor, r_ps: Tensor, eps: float, unbiased: bool) -> Tensor:
    """Corrective Advantage Gap per prompt (paper Eq. 4).

    Args:
        r_gt: floating [B, G], rewards under the true label.
        r_ps: floating [B, G], rewards under the pseudo label (same dtype).
        eps, unbiased: the advantage convention, as in :func:`group_advantage`.

    Returns:
        [B] of the inputs' dtype: || A(r_gt) - A(r_ps) ||_2 over the G rollouts.
    """
    diff = group_advantage(r_gt, eps, unbiased) - group_advantage(r_ps, eps, unbiased)
    return torch.linalg.vector_norm(diff, dim=1)


def classwise_cag(sizes: Tensor, eps: float, unbiased: bool,
                  dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """CAG of every count class k of a wrong majority.

    Args:
        sizes: int64 [B, G] cluster sizes in rank order (as :func:`cluster_stats` returns).
        eps, unbiased: the advantage convention of the CAG.
        dtype: output dtype of ``cag`` (the native op returns float32).

    Returns:
        cag: [B, G+1]. cag[b, k] = CAG between the pseudo reward vector (ones on the x = sizes[b,0]
            majority positions) and a true reward vector with ones on k *other* positions;
            0 where k is not admissible.
        admissible: bool [B, G+1]. k = 0 always; k = sizes[b, j] for every j >= 1 with
            0 < k <= x and x + k <= G (the GT, if present, is one whole non-majority cluster).
            A majority size x outside [0, G] is treated as 0.
    """
    B, G = sizes.shape
    dev = sizes.device
    x = sizes[:, 0] if G else torch.zeros(B, dtype=torch.long, device=dev)
    x = torch.where((x < 0) | (x > G), torch.zeros_like(x), x)
    admissible = torch.zeros(B, G + 1, dtype=torch.bool, device=dev)
    admissible[:, 0] = True
    if G > 1:
        k = sizes[:, 1:]
        ok = (k > 0) & (k <= x[:, None]) & (x[:, None] + k <= G)
        # not-ok entries write True into class 0, which is admissible anyway
        admissible.scatter_(1, torch.where(ok, k, torch.zeros_like(k)), torch.ones_like(ok))
    # explicit reward vectors: pseudo = ones on [0, x); true(k) = ones on [x, x + k)
    pos = torch.arange(G, device=dev)
    ks = torch.arange(G + 1, device=dev)
    r_ps = (pos[None, :] < x[:, None]).to(torch.float64)  # [B, G]
    lo, hi = x[:, None, None], x[:, None, None] + ks[None, :, None]
    r_gt = ((pos[None, None, :] >= lo) & (pos[None, None, :] < hi)).to(torch.float64)  # [B,G+1,G]
    r_ps_rep = r_ps[:, None, :].expand(B, G + 1, G).reshape(-1, G)
    values = cag(r_gt.reshape(-1, G), r_ps_rep, eps, unbiased).view(B, G + 1)
    values = torch.where(admissible, values, torch.zeros_like(values))
    return values.to(dtype), admissible


def expected_cag(logits: Tensor, cag_values: Tensor, admissible: Tensor) -> tuple[Tensor, Tensor]:
    """Stage-II class probabilities over admissible classes, and the expected CAG.

    Args:
        logits: floating [B, C] (C = G + 1 for CARE).
        cag_values: [B, C], same dtype, the class-wise CAG.
        admissible: bool [B, C].

    Returns:
        probs: [B, C], softmax over admissible classes, 0 elsewhere; all zero for a row with no
            admissible class.
        ecag: [B], sum_k probs * cag.
    """
    masked = logits.masked_fill(~admissible, float("-inf"))
    probs = torch.softmax(masked, dim=1) if logits.shape[1] else masked
    has_any = admissible.any(dim=1, keepdim=True)
    probs = torch.where(has_any & admissible, probs, torch.zeros_like(probs))
    return probs, (probs * cag_values).sum(dim=1)


# ----------------------------------------------------------------------------------------------
# per-prompt features (the part of the fused step before the classifiers)
# ----------------------------------------------------------------------------------------------
class GroupFeatures(NamedTuple):
    """Outputs of :func:`group_features` (and the first fields of the acquisition step)."""

    rank: Tensor            # int64 [B, G]
    sizes: Tensor           # int64 [B, G]
    prompt_feat: Tensor     # float32 [B, 1+G]: valid ratio, sizes / G
    len_norm: Tensor        # float32 [B, G]: clamp(length / max_len, 0, 1)
    minority_mask: Tensor   # bool [B, G]: valid and not in the majority cluster
    cag: Tensor             # float32 [B, G+1]: class-wise CAG
    admissible: Tensor      # bool [B, G+1]
    pseudo_rewards: Tensor  # float32 [B, G]: 1 on the majority cluster, else 0
    pseudo_adv: Tensor      # float32 [B, G]: group_advantage(pseudo_rewards, adv_eps, adv_unbiased)


def group_features(ids: Tensor, lengths: Tensor, max_len: float, cag_eps: float, cag_unbiased: bool,
                   adv_eps: float, adv_unbiased: bool, dtype: torch.dtype = torch.float32
                   ) -> GroupFeatures:
    """Everything CARE derives per prompt from the answer ids and lengths, in one pass.

    Args:
        ids: int64 [B, G] answer ids (negative = invalid).
        lengths: [B, G] response lengths in tokens (any real or integer dtype).
        max_len: length normaliser (> 0); the official code hard-codes 4000.
        cag_eps, cag_unbiased: advantage convention of the class-wise CAG.
        adv_eps, adv_unbiased: advantage convention of the pseudo-label advantages.
        dtype: floating dtype of the float outputs (the native op returns float32).

    Returns:
        :class:`GroupFeatures`.
    """
    B, G = ids.shape
    rank, sizes = cluster_stats(ids)
    valid = ids >= 0
    prompt_feat = torch.cat([valid.sum(1, keepdim=True), sizes], dim=1).to(dtype) / max(G, 1)
    len_norm = (lengths.to(dtype) / max_len).clamp(0.0, 1.0)
    minority = valid & (rank > 0)
    cag_values, admissible = classwise_cag(sizes, cag_eps, cag_unbiased, dtype=dtype)
    pseudo = (rank == 0).to(dtype)
    pseudo_adv = group_advantage(pseudo, adv_eps, adv_unbiased)
    return GroupFeatures(rank, sizes, prompt_feat, len_norm, minority, cag_values, admissible,
                         pseudo, pseudo_adv)


# ----------------------------------------------------------------------------------------------
# classifier forward and the fused acquisition step
# ----------------------------------------------------------------------------------------------
def classifier_forward(h_prompt: Tensor, prompt_feat: Tensor, h_resp: Tensor,
                       resp_feat: Tensor | None, resp_mask: Tensor | None,
                       weights: Sequence[Tensor]) -> Tensor:
    """Inference forward of a CARE classifier with BatchNorm folded into the Linear layers.

    Args:
        h_prompt: [B, H] prompt hidden states (float32/bfloat16/float16; computed in float32).
        prompt_feat: float [B, Fp] prompt scalar features (CARE: valid ratio and sizes / G).
        h_resp: [B, G, H] per-rollout hidden states (same dtype rules as h_prompt).
        resp_feat: float [B, G, Fr] per-rollout scalar features, or None (Fr = 0).
        resp_mask: bool [B, G] rollouts that enter the pool, or None (all of them).
        weights: 10 float32 tensors in :data:`CLASSIFIER_WEIGHT_NAMES` order:
            prompt_w [P, H+Fp], prompt_b [P], resp1_w [R1, H+Fr], resp1_b [R1],
            resp2_w [R2, R1], resp2_b [R2], head1_w [K, P+R2], head1_b [K],
            head2_w [C, K], head2_b [C]. Input columns are hidden first, then features.

    Returns:
        float32 [B, C] logits:
            p = relu(prompt_w [h_p ; f_p] + prompt_b)
            r_i = relu(resp2_w relu(resp1_w [h_i ; f_i] + resp1_b) + resp2_b)
            pool = mean of r_i over the rollouts in resp_mask (count clamped to >= 1; zero when
                the mask is empty), or over all G when resp_mask is None
            logits = head2_w relu(head1_w [p ; pool] + head1_b) + head2_b
    """
    pw, pb, r1w, r1b, r2w, r2b, h1w, h1b, h2w, h2b = weights
    f32 = pw.dtype
    B, G, H = h_resp.shape
    x_p = torch.cat([h_prompt.to(f32), prompt_feat.to(f32)], dim=1)
    p = torch.relu(x_p @ pw.T + pb)
    x_r = h_resp.to(f32)
    if resp_feat is not None:
        x_r = torch.cat([x_r, resp_feat.to(f32)], dim=2)
    r = torch.relu(torch.relu(x_r @ r1w.T + r1b) @ r2w.T + r2b)  # [B, G, R2]
    if resp_mask is None:
        pool = r.mean(dim=1) if G else r.sum(dim=1)
    else:
        m = resp_mask.to(f32)[..., None]
        pool = (r * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    z = torch.relu(torch.cat([p, pool], dim=1) @ h1w.T + h1b)
    return z @ h2w.T + h2b


class AcquisitionOutputs(NamedTuple):
    """Outputs of :func:`acquisition_step`: per-prompt features plus both classifiers' verdicts."""

    rank: Tensor            # int64 [B, G]
    sizes: Tensor           # int64 [B, G]
    reliability: Tensor     # float32 [B]: Stage-I P(majority correct) = softmax(logits1)[:, 1]
    stage1_logits: Tensor   # float32 [B, 2]
    probs: Tensor           # float32 [B, G+1]: Stage-II probs over admissible count classes
    ecag: Tensor            # float32 [B]: expected CAG
    cag: Tensor             # float32 [B, G+1]
    admissible: Tensor      # bool [B, G+1]
    pseudo_rewards: Tensor  # float32 [B, G]
    pseudo_adv: Tensor      # float32 [B, G]


def acquisition_step(ids: Tensor, lengths: Tensor, h_prompt: Tensor, h_resp: Tensor,
                     stage1: Sequence[Tensor], stage2: Sequence[Tensor], max_len: float,
                     cag_eps: float, cag_unbiased: bool, adv_eps: float, adv_unbiased: bool
                     ) -> AcquisitionOutputs:
    """The fused CARE acquisition step: ids + hidden states + lengths -> everything `decide` needs.

    Args:
        ids: int64 [B, G]; lengths: [B, G]; h_prompt: [B, H]; h_resp: [B, G, H] (fp32 or bf16).
        stage1: the Stage-I classifier's 10 folded weights (Fp = 1+G, Fr = 1, C = 2).
        stage2: the Stage-II classifier's 10 folded weights (Fp = 1+G, Fr = 0, C = G+1).
        max_len, cag_eps, cag_unbiased, adv_eps, adv_unbiased: as in :func:`group_features`.

    Returns:
        :class:`AcquisitionOutputs`. Stage-I pools all G rollouts with the normalised length as
        their feature; Stage-II pools the valid non-majority rollouts (masked mean) with no
        rollout feature, and its logits are softmaxed over the admissible classes only.
    """
    gf = group_features(ids, lengths, max_len, cag_eps, cag_unbiased, adv_eps, adv_unbiased)
    logits1 = classifier_forward(h_prompt, gf.prompt_feat, h_resp, gf.len_norm[..., None], None,
                                 stage1)
    logits2 = classifier_forward(h_prompt, gf.prompt_feat, h_resp, None, gf.minority_mask, stage2)
    probs, ecag = expected_cag(logits2, gf.cag, gf.admissible)
    reliability = torch.softmax(logits1, dim=1)[:, 1]
    return AcquisitionOutputs(gf.rank, gf.sizes, reliability, logits1, probs, ecag, gf.cag,
                              gf.admissible, gf.pseudo_rewards, gf.pseudo_adv)


def split_bf16(w: Tensor, terms: int, out: Tensor) -> None:
    """A float32 matrix as ``terms`` bfloat16 pieces (the twin of ``care_ext::_split_bf16``).

    Args:
        w: float32 [R, H], any strides, finite. terms: 1..3.
        out: bfloat16 [terms, R, H], written in place: piece 0 = bf16(w), piece t = bf16(w - sum
            of pieces < t), each rounded to nearest even, remainders in float32 (exact).

    Raises:
        ValueError: ``w`` holds a NaN or an Inf, or a value beyond bfloat16's range (|w| >=
            ~3.3962e38: its first piece rounds to infinity); ``out`` is then left unspecified.
    """
    rest = w.detach().clone()  # in place on one float32 remainder: no temporary per operation
    for t in range(terms):
        out[t].copy_(rest)  # round to nearest even
        rest.sub_(out[t])  # exact: what the piece left, in float32
    if rest.numel() > 0:  # finite iff w is and no piece overflowed; min and max carry any NaN
        lo, hi = torch.aminmax(rest)
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            raise ValueError("split_bf16: the weights hold NaN or Inf, or values beyond "
                             "bfloat16's range (|w| >= ~3.3962e38, whose first piece rounds to "
                             "infinity)")


def copy_into(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for every i (the twin of ``care_ext::_copy_into``).

    Args:
        dst: tensors written in place, each contiguous.
        src: as many tensors, ``src[i]`` of ``dst[i]``'s shape and dtype (no broadcasting, no
            casting), all on one device; none may overlap its ``dst[i]`` in memory (a ``src[i]``
            that *is* ``dst[i]`` is left alone).

    Raises:
        ValueError: the lists differ in length, or a pair differs in shape or dtype, or a dst is
            not contiguous, or the tensors are on more than one device.
    """
    if len(dst) != len(src):
        raise ValueError(f"copy_into: dst holds {len(dst)} tensors but src holds {len(src)}")
    for i, (d, s) in enumerate(zip(dst, src)):
        if d.dtype != s.dtype or d.shape != s.shape:
            raise ValueError(f"copy_into: dst[{i}] is {d.dtype} {tuple(d.shape)} but src[{i}] is "
                             f"{s.dtype} {tuple(s.shape)} (no casting, no broadcasting)")
        if not d.is_contiguous():
            raise ValueError(f"copy_into: dst[{i}] must be contiguous")
        if d.device != dst[0].device or s.device != dst[0].device:
            raise ValueError(f"copy_into: every tensor must be on {dst[0].device}, got dst[{i}] "
                             f"on {d.device} and src[{i}] on {s.device}")
    for d, s in zip(dst, src):
        d.copy_(s)


# ----------------------------------------------------------------------------------------------
# the fused BatchNorm -> Linear training layer (care_ext.bn_linear)
# ----------------------------------------------------------------------------------------------
def bn_linear_forward(xhat: Sequence[Tensor], weight: Tensor, bias: Tensor, gamma: Tensor,
                      beta: Tensor) -> Tensor:
    """Forward of a training-mode ``BatchNorm1d -> Linear`` on its normalised input (the twin of
    ``care_ext::_bn_linear_forward``).

    Args:
        xhat: the normalised input x̂ = (x - mean) / sqrt(var + eps) as column blocks [N, D_i]
            (sum of D_i = D), float32.
        weight: Linear weight W [O, D]; bias: b [O]; gamma, beta: BatchNorm's affine [D].

    Returns:
        float32 [N, O] = x̂ (W diag(gamma))^T + (W beta + b): the block products added to
        W beta + b one block after another.
    """
    out = torch.addmv(bias, weight, beta)[None, :]  # [1, O]: broadcast into the first block
    c = 0
    for xb in xhat:
        d = xb.shape[1]
        out = torch.addmm(out, xb, (weight[:, c:c + d] * gamma[c:c + d]).t())
        c += d
    return out


def bn_linear_backward(grad_out: Tensor, xhat: Sequence[Tensor], weight: Tensor, gamma: Tensor,
                       beta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four parameter gradients of :func:`bn_linear_forward` from one GEMM (the twin of
    ``care_ext::_bn_linear_backward``).

    With g = ``grad_out`` [N, O], M = g^T x̂ [O, D] and gsum = 1^T g [O]:

        grad_weight = M diag(gamma) + gsum beta^T     grad_bias = gsum
        grad_gamma  = column sums of W ⊙ M            grad_beta = gsum^T W

    (x̂ is data: no input gradient.) Returns float32 (grad_weight [O, D], grad_bias [O],
    grad_gamma [D], grad_beta [D]).
    """
    g = grad_out.contiguous()
    gsum = g.sum(0)
    return bn_linear_grads([g.t().mm(xb) for xb in xhat], gsum, weight, gamma, beta)


def bn_linear_grads(ms: Sequence[Tensor], gsum: Tensor, weight: Tensor, gamma: Tensor,
                    beta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_weight, grad_bias, grad_gamma, grad_beta) of :func:`bn_linear_backward` from the
    column blocks ``ms`` of M = g^T x̂ ([O, D_i] each, in block order) and gsum = 1^T g [O]; the
    blocks are written over. Also the end of care_ext.bn_linear's split-route backward, which
    forms M's blocks its own way."""
    m = torch.cat(list(ms), dim=1) if len(ms) > 1 else ms[0]
    grad_w = torch.mul(m, gamma).addr_(gsum, beta)
    grad_gamma = m.mul_(weight).sum(0)  # m is not needed any more: no second [O, D] buffer
    grad_beta = gsum @ weight
    return grad_w, gsum, grad_gamma, grad_beta
