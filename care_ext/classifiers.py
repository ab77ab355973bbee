"""CARE's Stage-I and Stage-II classifiers as torch modules, their losses, and BatchNorm folding.

Architecture (ARCHITECTURE.md §5, official dims 128/256/64/512, ReLU):

    prompt branch  BN(H+Fp) -> Linear(H+Fp, P) -> ReLU                 on [h_prompt ; prompt_feat]
    rollout branch BN(H+Fr) -> Linear(H+Fr, R1) -> ReLU -> Linear(R1, R2) -> ReLU   per rollout
    pool           mean over the pooled rollouts (all G, or a mask with count clamped to >= 1)
    head           BN(P+R2) -> Linear(P+R2, K) -> ReLU -> Linear(K, C)
    aux head       (Stage-I only, training only) same head shape on [p ; r_i] -> 2 per rollout

Stage-I: Fp = 1+G (valid ratio, sorted cluster sizes / G), Fr = 1 (length / max_len), all G
rollouts, C = 2. Stage-II: same prompt features, Fr = 0, valid non-majority rollouts only,
C = G+1 count logits (or C = 1 for the regression ablation).

In training mode the rollout branch's BatchNorm sees only the rollouts that enter the pool (the
official code feeds zeroed masked rows through it; leaving them out keeps its statistics those of
real rollouts). :meth:`CareClassifier.fold` turns the eval-mode module into the 10 float32 tensors
of :data:`care_ext.reference.CLASSIFIER_WEIGHT_NAMES` that the fused op consumes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bn_linear import bn_linear, resolve_first_layer_backward, resolve_first_layer_split
from .reference import CLASSIFIER_WEIGHT_NAMES


def _bn(bn: nn.BatchNorm1d, x: Tensor) -> Tensor:
    """BatchNorm that falls back to running statistics when a training batch has < 2 rows."""
    if bn.training and x.shape[0] < 2:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                            bn.eps)
    return bn(x)


def _fold_bn_linear(bn: nn.BatchNorm1d, lin: nn.Linear) -> tuple[Tensor, Tensor]:
    """W(s*x + t) + b = (W diag(s)) x + (W t + b), s = gamma/sqrt(var+eps), t = beta - mean*s."""
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    t = bn.bias - bn.running_mean * s
    w = lin.weight * s[None, :]
    b = lin.weight @ t + lin.bias
    return w.float().contiguous(), b.float().contiguous()


class _Head(nn.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(d_in)
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(_bn(self.bn, x))))


class CareClassifier(nn.Module):
    """One CARE classifier (Stage-I or Stage-II; see the module docstring for the layout).

    Args:
        hidden_size: H. prompt_feat: Fp. resp_feat: Fr (0 = no rollout feature).
        n_classes: C. prompt_dim, resp_hidden_dim, resp_out_dim, head_dim: P, R1, R2, K.
        aux: build the per-rollout auxiliary correctness head (Stage-I).
        first_layer_backward: how training runs the two first layers (BatchNorm -> Linear on
            data inputs): 'fused' (:func:`care_ext.bn_linear.bn_linear`, one GEMM in the backward
            instead of two), 'split' (fused, and bf16 inputs on the CPU multiplied by bf16 pieces
            of the weights and gradients without a normalised float32 copy: ``bn_linear``'s
            ``split``), 'autograd' (separate ops, the float order of earlier releases) or 'auto'
            (at widths of at least :data:`care_ext.bn_linear.FUSED_MIN_WIDTH` fused, and split
            on CPUs that multiply bf16 in hardware; autograd below). Same results up to float32
            rounding; evaluation and :meth:`fold` do not depend on it.
    """

    def __init__(self, hidden_size: int, prompt_feat: int, resp_feat: int, n_classes: int,
                 prompt_dim: int = 128, resp_hidden_dim: int = 64, resp_out_dim: int = 512,
                 head_dim: int = 256, aux: bool = False, first_layer_backward: str = "auto") -> None:
        super().__init__()
        self.hidden_size, self.resp_feat = hidden_size, resp_feat
        widths = hidden_size + prompt_feat, hidden_size + resp_feat
        self.fused_prompt = resolve_first_layer_backward(first_layer_backward, widths[0])
        self.fused_resp = resolve_first_layer_backward(first_layer_backward, widths[1])
        self.split_prompt = resolve_first_layer_split(first_layer_backward, widths[0])
        self.split_resp = resolve_first_layer_split(first_layer_backward, widths[1])
        self.prompt_bn = nn.BatchNorm1d(hidden_size + prompt_feat)
        self.prompt_fc = nn.Linear(hidden_size + prompt_feat, prompt_dim)
        self.resp_bn = nn.BatchNorm1d(hidden_size + resp_feat)
        self.resp_fc1 = nn.Linear(hidden_size + resp_feat, resp_hidden_dim)
        self.resp_fc2 = nn.Linear(resp_hidden_dim, resp_out_dim)
        self.head = _Head(prompt_dim + resp_out_dim, head_dim, n_classes)
        self.aux_head = _Head(prompt_dim + resp_out_dim, head_dim, 2) if aux else None

    def forward(self, h_prompt: Tensor, prompt_feat: Tensor, h_resp: Tensor,
                resp_feat: Tensor | None = None, resp_mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """Logits of the classifier.

        Args:
            h_prompt: [B, H]; prompt_feat: [B, Fp]; h_resp: [B, G, H] (any float dtype).
            resp_feat: [B, G, Fr] or None (required iff Fr > 0).
            resp_mask: bool [B, G] rollouts that enter the pool, or None (all G).

        Returns:
            logits float32 [B, C]; aux logits float32 [B, G, 2] (None without an aux head).
        """
        f32 = self.prompt_fc.weight.dtype
        B, G, _ = h_resp.shape
        if self.training and self.fused_prompt:
            p = torch.relu(bn_linear(self.prompt_bn, self.prompt_fc, [h_prompt, prompt_feat],
                                     split=self.split_prompt))
        else:
            p = torch.relu(self.prompt_fc(_bn(self.prompt_bn, torch.cat(
                [h_prompt.to(f32), prompt_feat.to(f32)], dim=1))))
        mask = (torch.ones(B, G, dtype=torch.bool, device=h_resp.device) if resp_mask is None
                else resp_mask)

        def pooled(x: Tensor) -> Tensor:  # [B, G, ...] -> the rows of the pooled rollouts
            # every rollout (no mask): all rows in order, a view instead of a gathered copy
            return x.reshape(B * G, *x.shape[2:]) if resp_mask is None else x[mask]

        # only pooled rollouts pass the rollout branch (and its BatchNorm)
        if self.training and self.fused_resp:
            parts = [pooled(h_resp)] + ([pooled(resp_feat)] if self.resp_feat else [])
            r1 = bn_linear(self.resp_bn, self.resp_fc1, parts, split=self.split_resp)
        else:
            x = h_resp.to(f32)
            if self.resp_feat:
                x = torch.cat([x, resp_feat.to(f32)], dim=2)
            r1 = self.resp_fc1(_bn(self.resp_bn, pooled(x)))
        r_rows = torch.relu(self.resp_fc2(torch.relu(r1)))
        if resp_mask is None:  # the same values as scattering into zeros under an all-true mask
            r = r_rows.view(B, G, r_rows.shape[1])
        else:
            r = r_rows.new_zeros(B, G, r_rows.shape[1])
            r[mask] = r_rows
        m = mask.to(f32)[..., None]
        pool = (r * m).sum(1) / m.sum(1).clamp(min=1.0)
        logits = self.head(torch.cat([p, pool], dim=1))
        aux = None
        if self.aux_head is not None:
            pr = torch.cat([p[:, None, :].expand(B, G, p.shape[1]), r], dim=2)
            aux = self.aux_head(pr.reshape(B * G, -1)).view(B, G, 2)
        return logits, aux

    @torch.no_grad()
    def fold(self) -> list[Tensor]:
        """The eval-mode network as 10 float32 tensors in ``CLASSIFIER_WEIGHT_NAMES`` order, with
        every BatchNorm (running statistics) folded into the Linear that follows it."""
        pw, pb = _fold_bn_linear(self.prompt_bn, self.prompt_fc)
        r1w, r1b = _fold_bn_linear(self.resp_bn, self.resp_fc1)
        h1w, h1b = _fold_bn_linear(self.head.bn, self.head.fc1)
        def copy(p: Tensor) -> Tensor:  # a parameter: the caller's copy must not follow training
            return p.detach().float().contiguous().clone()

        # the folded tensors are new products already (another copy of the first layers cost
        # ~1 ms per refresh at H = 4096 on the CPU)
        out = [pw, pb, r1w, r1b, copy(self.resp_fc2.weight), copy(self.resp_fc2.bias), h1w, h1b,
               copy(self.head.fc2.weight), copy(self.head.fc2.bias)]
        assert len(out) == len(CLASSIFIER_WEIGHT_NAMES)
        return out


def stage1_classifier(hidden_size: int, group_size: int, cfg) -> CareClassifier:
    """Stage-I (reliability): Fp = 1+G, Fr = 1, C = 2, aux head iff cfg.aux_weight > 0."""
    return CareClassifier(hidden_size, 1 + group_size, 1, 2, cfg.prompt_dim, cfg.resp_hidden_dim,
                          cfg.resp_out_dim, cfg.head_dim, aux=cfg.aux_weight > 0,
                          first_layer_backward=cfg.first_layer_backward)


def stage2_classifier(hidden_size: int, group_size: int, cfg, regression: bool = False
                      ) -> CareClassifier:
    """Stage-II (count of correct rollouts outside a wrong majority): Fp = 1+G, Fr = 0,
    C = G+1 count logits, or C = 1 (predicted CAG) for the regression ablation."""
    return CareClassifier(hidden_size, 1 + group_size, 0, 1 if regression else group_size + 1,
                          cfg.prompt_dim, cfg.resp_hidden_dim, cfg.resp_out_dim, cfg.head_dim,
                          first_layer_backward=cfg.first_layer_backward)


def class_weights(labels: Tensor, n_classes: int, power: float, clip: tuple[float, float]
                  ) -> Tensor:
    """Class-balancing weights from the labels of one training batch.

    Args:
        labels: int64 [N]. n_classes: C. power: w_c = count_c^-power (0 = all ones).
        clip: (lo, hi) applied after normalisation.

    Returns:
        float32 [C]: count^-power normalised so the present classes average 1, clipped to
        [lo, hi]; absent classes get 0.
    """
    counts = torch.bincount(labels, minlength=n_classes).float()
    present = counts > 0
    w = torch.zeros(n_classes, device=labels.device)
    if present.any():
        raw = counts[present].pow(-power)
        w[present] = (raw / raw.mean()).clamp(clip[0], clip[1])
    return w


def balanced_ce(logits: Tensor, labels: Tensor, power: float, clip: tuple[float, float],
                admissible: Tensor | None = None) -> Tensor:
    """Class-balanced cross-entropy (weighted mean over the batch).

    Args:
        logits: [N, C]; labels: int64 [N]; admissible: optional bool [N, C]: classes outside it
            are masked out of the softmax (each label must be admissible, else ValueError).
    """
    if admissible is not None:
        ok = admissible.gather(1, labels[:, None]).squeeze(1)
        if not bool(ok.all()):
            raise ValueError(f"Stage-II label not admissible for rows {(~ok).nonzero().flatten().tolist()}")
        logits = logits.masked_fill(~admissible, -1e9)
    w = class_weights(labels, logits.shape[1], power, clip)
    return F.cross_entropy(logits, labels, weight=w)
