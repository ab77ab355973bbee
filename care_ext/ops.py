"""Typed public entry points of the care_ext ops.

Each function calls ``torch.ops.care_ext.<name>`` when the native library is loaded and has a
kernel for the inputs' device (CPU always; CUDA when built with CUDA), and the pure-torch twin in
:mod:`care_ext.reference` otherwise. Semantics, shapes and dtypes are documented on the reference
functions and in ARCHITECTURE.md §3; the defaults below are the project's conventions:

    adv_eps=1e-6, adv_unbiased=False   GRPO advantage of the pseudo labels (population std + 1e-6)
    cag_eps=0.0,  cag_unbiased=False   advantage inside CAG (population std, no eps; the official
                                       code's convention, where the closed form of ARCHITECTURE.md holds)
    max_len=4000.0                     length normaliser (the official code hard-codes 4000)

Environment: ``CARE_EXT_FUSED_STEP=1`` routes :func:`acquisition_step` to the private
``_acquisition_step_fused`` op, with or without ``packed_weights`` (features + 4 first-layer
GEMMs + one kernel for the per-prompt tail; on the CPU its single-threaded-per-prompt twin).
Verified and measured on an H100 (the core's CUDA tests pass both ways; its decide took 6.1 ms
fused vs 7.5 ms at 64x8x4096, bench/RESULTS.md); off by default until a GPU session has run it
over more shapes. Same semantics, float32 summation order differs.

Inside a caller's ``torch.autocast`` region every function here still computes in float32 (the
native ops exclude the Autocast keys; the reference fallback runs with autocast off).
"""
from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch
from torch import Tensor

from . import reference
from .reference import AcquisitionOutputs, GroupFeatures

ADV_EPS = 1e-6
ADV_UNBIASED = False
CAG_EPS = 0.0
CAG_UNBIASED = False
MAX_LEN = 4000.0


def _native_devices() -> frozenset[str]:
    from . import HAS_NATIVE, build_info

    if not HAS_NATIVE:
        return frozenset()
    return frozenset({"cpu", "meta", "cuda"} if build_info().get("cuda") else {"cpu", "meta"})


_NATIVE_DEVICES: frozenset[str] | None = None


def native_available(device: torch.device | str) -> bool:
    """Whether a native kernel serves tensors on ``device`` (else the reference does)."""
    global _NATIVE_DEVICES
    if _NATIVE_DEVICES is None:
        _NATIVE_DEVICES = _native_devices()
    return torch.device(device).type in _NATIVE_DEVICES


def _float32_region(device: torch.device):
    """A context in which a caller's ``torch.autocast`` does not reach the reference's GEMMs.

    The native ops compute in float32 inside autocast regions (they exclude the Autocast keys);
    the reference fallback of :func:`classifier_forward` and :func:`acquisition_step` runs plain
    torch matmuls, which autocast would cast to bf16/fp16 (1e-3 to 1e-2 off in the logits), so
    the fallback runs with autocast off for the device: both paths give the same values in and
    out of autocast.
    """
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def cluster_stats(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Answer clusters per prompt: ids int64 [B, G] (-1 invalid) -> (rank int64 [B, G], sizes int64 [B, G]).

    See :func:`care_ext.reference.cluster_stats`: size descending, ties by first occurrence.
    """
    if native_available(ids.device):
        return tuple(torch.ops.care_ext.cluster_stats(ids))
    return reference.cluster_stats(ids)


def group_advantage(rewards: Tensor, eps: float = ADV_EPS, unbiased: bool = ADV_UNBIASED) -> Tensor:
    """GRPO advantage per prompt: rewards float [B, G] -> (r - mean) / (std + eps), 0 for constant rows."""
    if native_available(rewards.device):
        return torch.ops.care_ext.group_advantage(rewards, eps, unbiased)
    return reference.group_advantage(rewards, eps, unbiased)


def cag(r_gt: Tensor, r_ps: Tensor, eps: float = CAG_EPS, unbiased: bool = CAG_UNBIASED) -> Tensor:
    """Corrective Advantage Gap: ||A(r_gt) - A(r_ps)||_2 per prompt; [B, G] x2 -> [B]."""
    if native_available(r_gt.device):
        return torch.ops.care_ext.cag(r_gt, r_ps, eps, unbiased)
    return reference.cag(r_gt, r_ps, eps, unbiased)


def classwise_cag(sizes: Tensor, eps: float = CAG_EPS,
                  unbiased: bool = CAG_UNBIASED) -> tuple[Tensor, Tensor]:
    """CAG of each count class: sizes int64 [B, G] -> (cag float32 [B, G+1], admissible bool [B, G+1])."""
    if native_available(sizes.device):
        return tuple(torch.ops.care_ext.classwise_cag(sizes, eps, unbiased))
    return reference.classwise_cag(sizes, eps, unbiased)


def expected_cag(logits: Tensor, cag_values: Tensor, admissible: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over admissible classes and expected CAG: [B, C] x3 -> (probs [B, C], ecag [B])."""
    if native_available(logits.device):
        return tuple(torch.ops.care_ext.expected_cag(logits, cag_values, admissible))
    return reference.expected_cag(logits, cag_values, admissible)


def group_features(ids: Tensor, lengths: Tensor, max_len: float = MAX_LEN,
                   cag_eps: float = CAG_EPS, cag_unbiased: bool = CAG_UNBIASED,
                   adv_eps: float = ADV_EPS, adv_unbiased: bool = ADV_UNBIASED) -> GroupFeatures:
    """All per-prompt quantities CARE derives from ids [B, G] and lengths [B, G]; see
    :func:`care_ext.reference.group_features` for each field."""
    if native_available(ids.device):
        return GroupFeatures(*torch.ops.care_ext.group_features(
            ids, lengths, max_len, cag_eps, cag_unbiased, adv_eps, adv_unbiased))
    return reference.group_features(ids, lengths, max_len, cag_eps, cag_unbiased, adv_eps,
                                    adv_unbiased)


def classifier_forward(h_prompt: Tensor, prompt_feat: Tensor, h_resp: Tensor,
                       resp_feat: Tensor | None, resp_mask: Tensor | None,
                       weights: Sequence[Tensor]) -> Tensor:
    """Folded CARE classifier forward -> float32 logits [B, C]; see
    :func:`care_ext.reference.classifier_forward` for shapes and the weight layout."""
    if native_available(h_prompt.device):
        return torch.ops.care_ext.classifier_forward(h_prompt, prompt_feat, h_resp, resp_feat,
                                                     resp_mask, list(weights))
    with _float32_region(h_prompt.device):
        return reference.classifier_forward(h_prompt, prompt_feat, h_resp, resp_feat, resp_mask,
                                            weights)


def fused_step_layout(weights: Sequence[Tensor]) -> list[Tensor]:
    """The 10 folded weights of one classifier with every matrix stored column-major.

    Same shapes and values (``[out, in]`` tensors whose memory is ``[in, out]`` row-major, i.e.
    ``w.t().contiguous().t()``); biases unchanged. Every op accepts any strides; this is the layout
    in which the fused step's per-prompt CUDA kernel (``_acquisition_step_fused[_split]``) reads
    the weights coalesced: one thread per output unit, a warp's 32 threads read 32 consecutive
    floats. The CARE core keeps its folded weights in this layout on CUDA
    (:meth:`care_ext.trainer.ClassifierTrainer.folded`).

    Args:
        weights: 10 tensors in :data:`care_ext.reference.CLASSIFIER_WEIGHT_NAMES` order.

    Raises:
        ValueError: not 10 tensors, or a matrix slot (even index) that is not 2-D.
    """
    w = list(weights)
    if len(w) != 10:
        raise ValueError(f"fused_step_layout takes the 10 folded weights, got {len(w)}")
    for i in range(0, 10, 2):
        if w[i].dim() != 2:
            raise ValueError(f"weights[{i}] ({reference.CLASSIFIER_WEIGHT_NAMES[i]}) must be 2-D, "
                             f"got shape {tuple(w[i].shape)}")
        w[i] = w[i].t().contiguous().t()
    return w


#: Hidden sizes from which the CARE core stores its CPU weights side by side
#: (:func:`shared_first_layers`); below it (the CPU lab, H = 128) they stay row-major, so the lab's
#: recorded numbers keep their float32 summation order.
SHARED_LAYOUT_MIN_HIDDEN = 1024


def _side_by_side(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Views of ``a`` [Na, Ka] and ``b`` [Nb, Kb] over one row-major [max(Ka, Kb), Na + Nb]
    buffer: ``a`` transposed in its first Na columns, ``b`` in the next Nb."""
    na, nb = a.shape[0], b.shape[0]
    buf = a.new_zeros(max(a.shape[1], b.shape[1]), na + nb)
    buf[: a.shape[1], :na] = a.t()
    buf[: b.shape[1], na:] = b.t()
    return buf[: a.shape[1], :na].t(), buf[: b.shape[1], na:].t()


def shared_first_layers(stage1: Sequence[Tensor], stage2: Sequence[Tensor]
                        ) -> tuple[list[Tensor], list[Tensor]]:
    """Both classifiers' folded weights with each first layer stored next to the other stage's.

    Same shapes and values; ``prompt_w`` of both stages ([P1, H + Fp] and [P2, H + Fp]) become
    views of one row-major [H + Fp, P1 + P2] buffer, ``resp1_w`` ([R1, H + 1] and [R1', H])
    views of one [H + 1, R1 + R1'] buffer (Stage-I's columns first); every other tensor unchanged.
    Every op accepts any strides; on the CPU, ``acquisition_step`` recognises this layout and
    multiplies the hidden states by both stages' columns in one GEMM each for the prompts and for
    Stage-II's rollouts (MKL: one [rows, H] x [H, 128] product ~17% cheaper than two
    [rows, H] x [H, 64] on transposed row-major weights; bench/RESULTS.md). The CARE core keeps its
    CPU weights so at hidden sizes >= :data:`SHARED_LAYOUT_MIN_HIDDEN` (:func:`core_step_layout`).

    Args:
        stage1, stage2: 10 tensors each in :data:`care_ext.reference.CLASSIFIER_WEIGHT_NAMES`
            order (float32; matrices 2-D).

    Raises:
        ValueError: not 10 tensors each, or a first layer that is not 2-D.
    """
    w1, w2 = list(stage1), list(stage2)
    if len(w1) != 10 or len(w2) != 10:
        raise ValueError(f"shared_first_layers takes 10 folded weights per stage, got "
                         f"{len(w1)} and {len(w2)}")
    for i in (0, 2):  # prompt_w, resp1_w
        if w1[i].dim() != 2 or w2[i].dim() != 2:
            raise ValueError(f"weights[{i}] ({reference.CLASSIFIER_WEIGHT_NAMES[i]}) must be 2-D, "
                             f"got shapes {tuple(w1[i].shape)} and {tuple(w2[i].shape)}")
        w1[i], w2[i] = _side_by_side(w1[i], w2[i])
    return w1, w2


#: The environment variable that picks the CPU step's float32 GEMM (csrc/cpu/f32_gemm.cpp).
CPU_GEMM_ENV = "CARE_EXT_CPU_GEMM"


def cpu_step_packs_weights(hidden_size: int) -> bool:
    """Whether the CPU step and ``classifier_forward`` multiply their float32 first layers on
    care_ext's AVX2 GEMM at this hidden size, which packs the weights per call from any layout.

    ``CARE_EXT_CPU_GEMM``: 'avx2' yes, 'mkl' no; unset, empty or 'auto' as
    ``build_info()["cpu_f32_gemm"]`` says (x86 without AVX-512F) from
    ``build_info()["cpu_f32_gemm_min_hidden"]`` (1024) on, no below, as the op decides; any
    other value no (the op itself then raises, naming the variable).
    """
    from . import HAS_NATIVE, build_info

    mode = os.environ.get(CPU_GEMM_ENV, "") or "auto"
    if mode in ("avx2", "mkl"):
        return mode == "avx2"
    if mode != "auto" or not HAS_NATIVE:
        return False
    info = build_info()
    return info.get("cpu_f32_gemm") == "avx2" and hidden_size >= info["cpu_f32_gemm_min_hidden"]


def core_step_layout(stage1: Sequence[Tensor], stage2: Sequence[Tensor], hidden_size: int
                     ) -> tuple[list[Tensor], list[Tensor]]:
    """The layout in which the CARE core passes its folded weights to the step ops, by device.

    CUDA: every matrix column-major (:func:`fused_step_layout`); CPU at ``hidden_size`` >=
    :data:`SHARED_LAYOUT_MIN_HIDDEN`: the first layers side by side (:func:`shared_first_layers`,
    one MKL GEMM for both stages), except where the step runs on the AVX2 GEMM
    (:func:`cpu_step_packs_weights`), which packs them from any layout: there the side-by-side
    copy would be work for nothing (3 ms of a 19 ms decide at 64x8x4096 on a 2-core EPYC,
    bench/RESULTS.md, eighteenth session); otherwise unchanged. Same shapes and values in every
    case; benchmarks call this to measure what the core runs
    (:meth:`care_ext.trainer.ClassifierTrainer.folded`).
    """
    if stage1[0].is_cuda:
        return fused_step_layout(stage1), fused_step_layout(stage2)
    if hidden_size >= SHARED_LAYOUT_MIN_HIDDEN and not cpu_step_packs_weights(hidden_size):
        return shared_first_layers(stage1, stage2)
    return list(stage1), list(stage2)


def cpu_step_packed_numel(stage1: Sequence[Tensor], stage2: Sequence[Tensor],
                          hidden_size: int) -> int:
    """float32 elements of :func:`pack_cpu_step_weights`'s buffer for these weights: the 16-column
    panels of both stages' rollout and prompt first layers (hidden columns, K = ``hidden_size``),
    rollout layer 2 (K = R1) and head layer 1 (K = P + R2), as ``csrc/cpu/f32_step_pack.cpp``
    lays them out (the op checks the size it is given against its own count)."""
    def panels(w: Tensor, k: int) -> int:  # [N, K] weight -> K x ceil(N / 16) x 16 floats
        return k * -(-int(w.shape[0]) // 16) * 16

    H = int(hidden_size)
    n = 0
    for w in (stage1, stage2):
        n += panels(w[2], H) + panels(w[4], int(w[4].shape[1]))  # resp1_w, resp2_w
        n += panels(w[0], H) + panels(w[6], int(w[6].shape[1]))  # prompt_w, head1_w
    return n


def pack_cpu_step_weights(stage1: Sequence[Tensor], stage2: Sequence[Tensor], hidden_size: int,
                          out: Tensor | None = None) -> Tensor | None:
    """The CPU step's float32 weights packed once for its AVX2 GEMM: the ``packed_weights``
    argument of :func:`acquisition_step`, valid until the weights change.

    The float32 step otherwise packs these weights (both stages' rollout and prompt first layers,
    rollout layer 2, head layer 1; ~7.5 MB at H = 4096) at every call, most of them transposed:
    7% of its samples at 64x8x4096 on a 2-core EPYC (bench/RESULTS.md, nineteenth session). The
    CARE core packs after each classifier update (``CareConfig.first_layer_pack``).

    Args:
        stage1, stage2: both classifiers' 10 folded float32 CPU weights (any strides).
        hidden_size: H.
        out: a float32 buffer to pack into (reused when it has the right size, as the core does
            after every update: a fresh 7.5 MB costs page faults), else a new one.

    Returns:
        A 1-D float32 tensor of :func:`cpu_step_packed_numel` elements, or None where the step
        does not run the AVX2 GEMM (:func:`cpu_step_packs_weights` false, weights not on the CPU,
        or no native library).

    Raises:
        RuntimeError: weights whose shapes do not make two CARE classifiers (the op names them).
    """
    if (stage1[0].device.type != "cpu" or not native_available("cpu")
            or not cpu_step_packs_weights(hidden_size)):
        return None
    n = cpu_step_packed_numel(stage1, stage2, hidden_size)
    if out is None or out.numel() != n or out.dtype != torch.float32 or not out.is_contiguous():
        out = torch.empty(n, dtype=torch.float32)
    torch.ops.care_ext._pack_f32_step(list(stage1), list(stage2), out)
    return out


def acquisition_step(ids: Tensor, lengths: Tensor, h_prompt: Tensor, h_resp: Tensor,
                     stage1: Sequence[Tensor], stage2: Sequence[Tensor], max_len: float = MAX_LEN,
                     cag_eps: float = CAG_EPS, cag_unbiased: bool = CAG_UNBIASED,
                     adv_eps: float = ADV_EPS, adv_unbiased: bool = ADV_UNBIASED, *,
                     first_layer_split: Sequence[Tensor] | None = None,
                     packed_weights: Tensor | None = None) -> AcquisitionOutputs:
    """The fused acquisition step (features, both classifiers, expected CAG, pseudo advantages).

    Args and outputs as :func:`care_ext.reference.acquisition_step`; hidden states may be float32
    or bfloat16 and are read once. ``CARE_EXT_FUSED_STEP=1`` selects the private fused kernel
    (module docstring). ``first_layer_split`` (bf16 hidden states only): the bf16 pieces of both
    first layers (:func:`care_ext.bf16_split.first_layer_split`); the native step then multiplies
    with bf16 GEMMs, exact products and float32 sums -- on CUDA the fused step's tensor-core GEMMs,
    on the CPU ``_acquisition_step_split`` (MKL's bf16 GEMM on AMX / AVX512-BF16 where torch has
    it, ``build_info()["cpu_bf16_gemm"]``). On the CPU it may also hold the pieces' packing
    (4 tensors: :func:`care_ext.bf16_split.pack_first_layer_split`), multiplied by oneDNN's BRGeMM
    on AMX without per-call packing. ``packed_weights`` (CPU, float32 first layers): the weights
    packed once for the AVX2 GEMM (:func:`pack_cpu_step_weights`, from these very weights: a
    stale packing is not detected, only a wrong size); the step then skips its per-call packing,
    same bits. With ``CARE_EXT_FUSED_STEP=1`` the fused op runs and ``packed_weights`` is not
    used (the fused op packs nothing; packed or not, a decide then takes the same route, so the
    same bits). The reference fallback ignores both (same values up to float32 rounding)."""
    if first_layer_split is not None and packed_weights is not None:
        raise ValueError("acquisition_step: pass first_layer_split or packed_weights, not both "
                         "(they are packings of different first-layer GEMMs)")
    fused = os.environ.get("CARE_EXT_FUSED_STEP") == "1"
    if native_available(ids.device) and packed_weights is not None:
        if ids.device.type != "cpu":
            raise ValueError(f"acquisition_step: packed_weights serves the CPU step; the inputs "
                             f"are on {ids.device}")
        if not fused:
            return AcquisitionOutputs(*torch.ops.care_ext._acquisition_step_f32_packed(
                ids, lengths, h_prompt, h_resp, list(stage1), list(stage2), max_len, cag_eps,
                cag_unbiased, adv_eps, adv_unbiased, packed_weights))
    if native_available(ids.device) and first_layer_split is not None:
        op = (torch.ops.care_ext._acquisition_step_split if ids.device.type == "cpu"
              else torch.ops.care_ext._acquisition_step_fused_split)
        return AcquisitionOutputs(*op(ids, lengths, h_prompt, h_resp, list(stage1), list(stage2),
                                      max_len, cag_eps, cag_unbiased, adv_eps, adv_unbiased,
                                      list(first_layer_split)))
    if native_available(ids.device):
        op = (torch.ops.care_ext._acquisition_step_fused if fused
              else torch.ops.care_ext.acquisition_step)
        return AcquisitionOutputs(*op(ids, lengths, h_prompt, h_resp, list(stage1), list(stage2), max_len,
                                      cag_eps, cag_unbiased, adv_eps, adv_unbiased))
    with _float32_region(ids.device):
        return reference.acquisition_step(ids, lengths, h_prompt, h_resp, stage1, stage2, max_len,
                                          cag_eps, cag_unbiased, adv_eps, adv_unbiased)


def _cpu_native(t: Tensor) -> bool:
    """Whether a CPU-only native op serves ``t`` (on the CPU or meta, with the native library)."""
    return t.device.type in ("cpu", "meta") and native_available(t.device)


def bn_linear_forward(xhat: Sequence[Tensor], weight: Tensor, bias: Tensor, gamma: Tensor,
                      beta: Tensor) -> Tensor:
    """Forward of the fused BatchNorm -> Linear training layer on its normalised input:
    float32 blocks [N, D_i] -> [N, O] = x̂ (W diag(gamma))^T + (W beta + b); see
    :func:`care_ext.reference.bn_linear_forward`. On the CPU the native op (where the CPU step
    runs care_ext's AVX2 GEMM, :func:`cpu_step_packs_weights`, its first block multiplies on it;
    elsewhere the twin's ATen calls, the same bits); on other devices the twin."""
    if _cpu_native(weight):
        return torch.ops.care_ext._bn_linear_forward(list(xhat), weight, bias, gamma, beta)
    return reference.bn_linear_forward(xhat, weight, bias, gamma, beta)


def bn_linear_backward(grad_out: Tensor, xhat: Sequence[Tensor], weight: Tensor, gamma: Tensor,
                       beta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The parameter gradients of :func:`bn_linear_forward` (grad_weight [O, D], grad_bias [O],
    grad_gamma [D], grad_beta [D]) from one g^T x̂; see
    :func:`care_ext.reference.bn_linear_backward`. On the CPU the native op (on the AVX2 GEMM
    where the CPU step runs it: g^T x̂ a 16-column panel at a time with the gradients finished in
    the same pass; elsewhere the twin's ATen calls, the same bits); on other devices the twin."""
    if _cpu_native(weight):
        return tuple(torch.ops.care_ext._bn_linear_backward(grad_out, list(xhat), weight, gamma,
                                                            beta))
    return reference.bn_linear_backward(grad_out, xhat, weight, gamma, beta)


def copy_into(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for every i, in one call: the native ``care_ext::_copy_into``
    where it serves the device (on CUDA one kernel launch for every 8 contiguous pairs, whatever
    their dtypes; torch's ``_foreach_copy_`` launches once per tensor unless all share one dtype),
    else :func:`care_ext.reference.copy_into`. Contract as there: same shapes and dtypes, one
    device, each dst contiguous, no pair overlapping (a src that is its dst is skipped)."""
    if dst and native_available(dst[0].device):
        torch.ops.care_ext._copy_into(list(dst), list(src))
    else:
        reference.copy_into(dst, src)
