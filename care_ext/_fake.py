"""Fake (meta) implementations of every care_ext op, for torch.compile and FakeTensor tracing.

Imported by care_ext/__init__.py only when the native library is loaded (the schemas come from it).
They check what can be checked without data and return empty tensors of the right shape/dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .reference import MAX_GROUP_SIZE

_LIB = "care_ext::"


def _check_group(G: int, name: str) -> None:
    torch._check(1 <= G <= MAX_GROUP_SIZE, lambda: f"{name}: need 1 <= G <= {MAX_GROUP_SIZE}, got {G}")


@torch.library.register_fake(_LIB + "cluster_stats")
def _cluster_stats(ids: Tensor):
    torch._check(ids.dim() == 2 and ids.dtype == torch.int64, lambda: "ids must be int64 [B, G]")
    _check_group(ids.shape[1], "ids")
    return ids.new_empty(ids.shape), ids.new_empty(ids.shape)


@torch.library.register_fake(_LIB + "group_advantage")
def _group_advantage(rewards: Tensor, eps: float, unbiased: bool):
    torch._check(rewards.dim() == 2, lambda: "rewards must be [B, G]")
    _check_group(rewards.shape[1], "rewards")
    return rewards.new_empty(rewards.shape)


@torch.library.register_fake(_LIB + "cag")
def _cag(r_gt: Tensor, r_ps: Tensor, eps: float, unbiased: bool):
    torch._check(r_gt.dim() == 2 and r_gt.shape == r_ps.shape, lambda: "r_gt, r_ps must be [B, G]")
    _check_group(r_gt.shape[1], "r_gt")
    return r_gt.new_empty(r_gt.shape[0])


@torch.library.register_fake(_LIB + "classwise_cag")
def _classwise_cag(sizes: Tensor, eps: float, unbiased: bool):
    torch._check(sizes.dim() == 2, lambda: "sizes must be [B, G]")
    B, G = sizes.shape
    _check_group(G, "sizes")
    return (sizes.new_empty((B, G + 1), dtype=torch.float32),
            sizes.new_empty((B, G + 1), dtype=torch.bool))


@torch.library.register_fake(_LIB + "expected_cag")
def _expected_cag(logits: Tensor, cag: Tensor, admissible: Tensor):
    torch._check(logits.dim() == 2 and logits.shape == cag.shape == admissible.shape,
                 lambda: "logits, cag, admissible must be [B, C]")
    return logits.new_empty(logits.shape), logits.new_empty(logits.shape[0])


@torch.library.register_fake(_LIB + "group_features")
def _group_features(ids: Tensor, lengths: Tensor, max_len: float, cag_eps: float,
                    cag_unbiased: bool, adv_eps: float, adv_unbiased: bool):
    torch._check(ids.dim() == 2 and ids.shape == lengths.shape, lambda: "ids, lengths: [B, G]")
    B, G = ids.shape
    _check_group(G, "ids")
    f32 = dict(dtype=torch.float32)
    b8 = dict(dtype=torch.bool)
    return (ids.new_empty((B, G)), ids.new_empty((B, G)), ids.new_empty((B, G + 1), **f32),
            ids.new_empty((B, G), **f32), ids.new_empty((B, G), **b8),
            ids.new_empty((B, G + 1), **f32), ids.new_empty((B, G + 1), **b8),
            ids.new_empty((B, G), **f32), ids.new_empty((B, G), **f32))


@torch.library.register_fake(_LIB + "classifier_forward")
def _classifier_forward(h_prompt: Tensor, prompt_feat: Tensor, h_resp: Tensor, resp_feat, resp_mask,
                        weights):
    torch._check(len(weights) == 10, lambda: "weights must hold 10 tensors")
    return h_prompt.new_empty((h_prompt.shape[0], weights[8].shape[0]), dtype=torch.float32)


@torch.library.register_fake(_LIB + "_acquisition_step_fused")
@torch.library.register_fake(_LIB + "acquisition_step")
def _acquisition_step(ids: Tensor, lengths: Tensor, h_prompt: Tensor, h_resp: Tensor, stage1,
                      stage2, max_len: float, cag_eps: float, cag_unbiased: bool, adv_eps: float,
                      adv_unbiased: bool):
    rank, sizes, _, _, _, cag, adm, pseudo, adv = _group_features(
        ids, lengths, max_len, cag_eps, cag_unbiased, adv_eps, adv_unbiased)
    B, G = ids.shape
    f32 = dict(dtype=torch.float32)
    return (rank, sizes, ids.new_empty((B,), **f32), ids.new_empty((B, 2), **f32),
            ids.new_empty((B, G + 1), **f32), ids.new_empty((B,), **f32), cag, adm, pseudo, adv)


@torch.library.register_fake(_LIB + "_acquisition_step_split")
def _acquisition_step_split(ids: Tensor, lengths: Tensor, h_prompt: Tensor, h_resp: Tensor,
                            stage1, stage2, max_len: float, cag_eps: float, cag_unbiased: bool,
                            adv_eps: float, adv_unbiased: bool, first_layer_split):
    torch._check(len(first_layer_split) in (2, 4),
                 lambda: "first_layer_split must hold 2 tensors, or 4 with their packing")
    return _acquisition_step(ids, lengths, h_prompt, h_resp, stage1, stage2, max_len, cag_eps,
                             cag_unbiased, adv_eps, adv_unbiased)


@torch.library.register_fake(_LIB + "_acquisition_step_f32_packed")
def _acquisition_step_f32_packed(ids: Tensor, lengths: Tensor, h_prompt: Tensor, h_resp: Tensor,
                                 stage1, stage2, max_len: float, cag_eps: float,
                                 cag_unbiased: bool, adv_eps: float, adv_unbiased: bool,
                                 packed: Tensor):
    torch._check(packed.dim() == 1 and packed.dtype == torch.float32,
                 lambda: "packed must be 1-D float32 (care_ext.ops.pack_cpu_step_weights)")
    return _acquisition_step(ids, lengths, h_prompt, h_resp, stage1, stage2, max_len, cag_eps,
                             cag_unbiased, adv_eps, adv_unbiased)


@torch.library.register_fake(_LIB + "_pack_f32_step")
def _pack_f32_step(stage1, stage2, out: Tensor):
    torch._check(out.dim() == 1 and out.dtype == torch.float32, lambda: "out must be 1-D float32")
    return None


@torch.library.register_fake(_LIB + "_acquisition_step_fused_split")
def _acquisition_step_fused_split(ids: Tensor, lengths: Tensor, h_prompt: Tensor, h_resp: Tensor,
                                  stage1, stage2, max_len: float, cag_eps: float, cag_unbiased: bool,
                                  adv_eps: float, adv_unbiased: bool, first_layer_split):
    torch._check(len(first_layer_split) in (0, 2), lambda: "first_layer_split must hold 0 or 2 tensors")
    return _acquisition_step(ids, lengths, h_prompt, h_resp, stage1, stage2, max_len, cag_eps,
                             cag_unbiased, adv_eps, adv_unbiased)


@torch.library.register_fake(_LIB + "_split_bf16")
def _split_bf16(w: Tensor, terms: int, out: Tensor):
    torch._check(w.dim() == 2 and w.dtype == torch.float32, lambda: "w must be float32 [R, H]")
    torch._check(out.dtype == torch.bfloat16 and tuple(out.shape) == (terms, *w.shape),
                 lambda: "out must be bfloat16 [terms, R, H]")
    return None


@torch.library.register_fake(_LIB + "_copy_into")
def _copy_into(dst, src):
    torch._check(len(dst) == len(src), lambda: "dst and src must hold as many tensors")
    for d, s in zip(dst, src):
        torch._check(d.dtype == s.dtype and d.shape == s.shape,
                     lambda: "each dst and src pair must have one shape and dtype")
    return None


@torch.library.register_fake(_LIB + "_pack_bf16_split")
def _pack_bf16_split(split: Tensor, out: Tensor):
    torch._check(split.dim() == 3 and split.dtype == torch.bfloat16,
                 lambda: "split must be bfloat16 [T, R, H]")
    torch._check(out.dtype == torch.bfloat16 and out.dim() == 1, lambda: "out must be 1-D bfloat16")
    return None


@torch.library.register_fake(_LIB + "_bf16_mm")
def _bf16_mm(a: Tensor, b: Tensor):
    torch._check(a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0],
                 lambda: "a [M, K] and b [K, N] expected")
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)


@torch.library.register_fake(_LIB + "_column_stats")
def _column_stats(x: Tensor):
    torch._check(x.dim() == 2, lambda: "x must be [N, D]")
    return (x.new_empty((x.shape[1],), dtype=torch.float32),
            x.new_empty((x.shape[1],), dtype=torch.float32))


@torch.library.register_fake(_LIB + "_bn_linear_forward")
def _bn_linear_forward(xhat, weight: Tensor, bias: Tensor, gamma: Tensor, beta: Tensor):
    torch._check(len(xhat) > 0 and weight.dim() == 2, lambda: "xhat blocks and weight [O, D]")
    torch._check(sum(x.shape[1] for x in xhat) == weight.shape[1],
                 lambda: "xhat blocks must be as wide as the weight")
    return weight.new_empty((xhat[0].shape[0], weight.shape[0]), dtype=torch.float32)


@torch.library.register_fake(_LIB + "_bn_linear_backward")
def _bn_linear_backward(grad_out: Tensor, xhat, weight: Tensor, gamma: Tensor, beta: Tensor):
    torch._check(len(xhat) > 0 and weight.dim() == 2, lambda: "xhat blocks and weight [O, D]")
    torch._check(grad_out.dim() == 2 and grad_out.shape[1] == weight.shape[0],
                 lambda: "grad_out must be [N, O]")
    O, D = weight.shape
    return (weight.new_empty((O, D), dtype=torch.float32),
            weight.new_empty((O,), dtype=torch.float32),
            weight.new_empty((D,), dtype=torch.float32),
            weight.new_empty((D,), dtype=torch.float32))
