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

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from . import reference
from .ops import native_available

TERMS = 3
"""Default pieces per weight: 3 reproduces float32 weights to within float32 rounding (2^-24
relative); 2 leaves up to 2^-16 relative, a third less tensor-core work."""


GEMM_MODES = {"float32": 0, "bf16x3": 3, "bf16x2": 2}
"""``CareConfig.first_layer_gemm`` values with a fixed meaning -> bf16 pieces per weight (0: the
float32 GEMMs). 'auto' resolves to one of them (:func:`resolve_first_layer_gemm`)."""
AUTO_MIN_HIDDEN = 1024
"""'auto' splits only at hidden sizes >= this (LLM sizes, where the first layers are the step's
cost); below it the float32 path and its float order are kept (the CPU lab, H = 128)."""


@functools.cache
def cpu_bf16_hardware() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX-BF16 or AVX512-BF16 in /proc/cpuinfo's
    flags; False where there is no /proc/cpuinfo) and the library reaches MKL's bf16 GEMM
    (``care_ext.build_info()["cpu_bf16_gemm"]``). Read once per process."""
    from . import build_info
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    return bool(build_info().get("cpu_bf16_gemm")) and bf16_flags_in(text)


def bf16_flags_in(cpuinfo: str) -> bool:
    """Whether the first ``flags`` line of a /proc/cpuinfo text names amx_bf16 or avx512_bf16."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool(set(line.partition(":")[2].split()) & {"amx_bf16", "avx512_bf16"})
    return False


def resolve_first_layer_gemm(mode: str, device: torch.device | str, hidden_size: int) -> int:
    """bf16 pieces per first-layer weight for ``CareConfig.first_layer_gemm`` (0 = float32 GEMMs).

    Args:
        mode: 'float32', 'bf16x3', 'bf16x2', or 'auto': 3 on a CPU with bf16 hardware
            (:func:`cpu_bf16_hardware`) at ``hidden_size`` >= :data:`AUTO_MIN_HIDDEN`, else 0
            (CUDA: on an H100 the core decided slower with the split, 11.1 vs 7.5 ms at
            64x8x4096, as it re-splits through torch ops after every update; CPUs without bf16
            units would run the split products as float32 GEMMs on converted copies, slower).
        device: where the CARE core runs its classifiers.
        hidden_size: H.

    Raises:
        ValueError: an unknown mode.
    """
    if mode == "auto":
        return 3 if (torch.device(device).type == "cpu" and hidden_size >= AUTO_MIN_HIDDEN
                     and cpu_bf16_hardware()) else 0
    if mode not in GEMM_MODES:
        raise ValueError(f"first_layer_gemm must be 'auto' or one of {tuple(GEMM_MODES)}, got "
                         f"{mode!r}")
    return GEMM_MODES[mode]


def split_bf16(w: Tensor, terms: int = TERMS, out: Tensor | None = None) -> Tensor:
    """Split a float32 tensor into ``terms`` bfloat16 pieces whose float32 sum approximates it.

    Args:
        w: float32, any shape and strides, finite.
        terms: 1..3.
        out: optional bfloat16 [terms, *w.shape] (any strides) to write the pieces into; a caller
            that re-splits weights of one shape reuses it (the CARE core, after every update).

    Returns:
        bfloat16 [terms, *w.shape] (``out`` when given): piece 0 = bf16(w), piece t =
        bf16(w - sum of pieces < t) (round to nearest even). ``split_bf16(w).float().sum(0)``
        equals ``w`` to 2^-24 relative for 3 pieces, 2^-16 for 2, 2^-8 for 1 (bf16 has float32's
        exponent range: weights below ~3.396e38 split without overflow, larger ones are refused;
        pieces of weights below ~2^-110 lose bits to bf16's subnormals). On the CPU a 2-D ``w`` runs
        ``care_ext::_split_bf16`` (one pass, same pieces bit for bit), otherwise
        :func:`care_ext.reference.split_bf16` (torch ops).

    Raises:
        ValueError: non-float32 input, terms outside 1..3, ``out`` of the wrong shape, dtype or
            device, or non-finite values or values beyond bf16's range (``out``'s contents are
            then unspecified).
    """
    if w.dtype != torch.float32:
        raise ValueError(f"split_bf16 takes float32 weights, got {w.dtype}")
    if not 1 <= terms <= 3:
        raise ValueError(f"terms must be 1, 2 or 3, got {terms}")
    shape = (terms, *w.shape)
    if out is None:
        out = torch.empty(shape, dtype=torch.bfloat16, device=w.device)
    elif out.dtype != torch.bfloat16 or tuple(out.shape) != shape or out.device != w.device:
        raise ValueError(f"split_bf16: out must be bfloat16 {list(shape)} on {w.device}, got "
                         f"{out.dtype} {list(out.shape)} on {out.device}")
    if w.dim() == 2 and w.device.type == "cpu" and native_available(w.device):
        torch.ops.care_ext._split_bf16(w.detach(), terms, out)
    else:
        reference.split_bf16(w, terms, out)
    return out


def first_layer_split(stage1: Sequence[Tensor], stage2: Sequence[Tensor], hidden_size: int,
                      terms: int = TERMS, out: Sequence[Tensor] | None = None) -> list[Tensor]:
    """The ``first_layer_split`` argument of the fused step for two folded classifiers.

    Args:
        stage1, stage2: the 10 folded float32 weights of each classifier
            (:data:`care_ext.reference.CLASSIFIER_WEIGHT_NAMES` order: prompt_w [P, H + Fp],
            resp1_w [R1, H + Fr], ...), any strides.
        hidden_size: H (the first H columns of prompt_w and resp1_w are the hidden-state ones).
        terms: bf16 pieces per weight (1..3).
        out: optional result of an earlier call with the same shapes, overwritten in place (the
            CARE core re-splits after every update into the same buffers).

    Returns:
        [rollout bf16 [terms, R1_1 + R1_2, H], prompt bf16 [terms, P_1 + P_2, H]], contiguous:
        both stages' hidden columns stacked (Stage-I's units first) and split with
        :func:`split_bf16`, each stage written straight into its rows.

    Raises:
        ValueError: not 10 weights per stage, first layers narrower than H, ``out`` that does not
            match, or non-finite weights.
    """
    H = int(hidden_size)
    for name, w in (("stage1", stage1), ("stage2", stage2)):
        if len(w) != 10:
            raise ValueError(f"{name} must hold 10 folded weights, got {len(w)}")
        for i in (0, 2):
            if w[i].dim() != 2 or w[i].shape[1] < H:
                raise ValueError(f"{name}[{i}] must be [units, H + features] with H = {H}, "
                                 f"got {tuple(w[i].shape)}")
    if out is not None and len(out) != 2:
        raise ValueError(f"first_layer_split: out must hold 2 tensors, got {len(out)}")
    result = []
    for k, i in enumerate((2, 0)):  # rollout (resp1_w), then prompt (prompt_w)
        n1, n2 = stage1[i].shape[0], stage2[i].shape[0]
        shape = (terms, n1 + n2, H)
        buf = out[k] if out is not None else None
        if buf is None:
            buf = torch.empty(shape, dtype=torch.bfloat16, device=stage1[i].device)
        elif (buf.dtype != torch.bfloat16 or tuple(buf.shape) != shape
              or buf.device != stage1[i].device or not buf.is_contiguous()):
            raise ValueError(f"first_layer_split: out[{k}] must be a contiguous bfloat16 "
                             f"{list(shape)} on {stage1[i].device}, got {buf.dtype} "
                             f"{list(buf.shape)} on {buf.device}")
        split_bf16(stage1[i][:, :H], terms, out=buf[:, :n1])
        split_bf16(stage2[i][:, :H], terms, out=buf[:, n1:])
        result.append(buf)
    return result


PACK_COLS = 64
"""Split rows per packed block (oneDNN's bf16 BRGeMM packs at most 64 columns of B at a time)."""


def cpu_brgemm_available() -> bool:
    """Whether the CPU split step can multiply on packed pieces (:func:`pack_first_layer_split`):
    oneDNN's bf16 BRGeMM on AMX through torch, with the packed layout checked once against
    oneDNN's own packing (``build_info()["cpu_brgemm"]``). False on CPUs without AMX-BF16, without
    the native library, or with ``CARE_EXT_CPU_BRGEMM=0`` in the environment when it loaded."""
    from . import build_info
    return bool(build_info().get("cpu_brgemm"))


def packed_numel(rows: int, hidden_size: int) -> int:
    """Elements of the packing of ``rows`` split rows of ``hidden_size`` (even) bf16 values: per
    block of :data:`PACK_COLS` rows, ``hidden_size`` times the block's rows rounded up to 16."""
    full, rest = divmod(int(rows), PACK_COLS)
    return int(hidden_size) * (full * PACK_COLS + (rest + 15) // 16 * 16)


def pack_first_layer_split(split: Sequence[Tensor], out: Sequence[Tensor] | None = None
                           ) -> list[Tensor] | None:
    """The packing of :func:`first_layer_split`'s pieces for the CPU split step's BRGeMM calls.

    The CPU step (``_acquisition_step_split``) then takes ``[*split, *packed]`` as its
    ``first_layer_split`` and multiplies on the packed pieces, instead of MKL's GEMM re-packing
    them at every call (bench/RESULTS.md, tenth session: a 32-row block 153 instead of 323 us).
    Pack again whenever the pieces change (the CARE core does so after every update). While
    ``torch.backends.mkldnn`` is disabled (torch's BRGeMM needs it) the step ignores the packing
    and runs MKL's GEMM on the pieces.

    Args:
        split: [rollout bf16 [T, R1, H], prompt bf16 [T, P, H]] on the CPU, H even.
        out: optional result of an earlier call with the same shapes, overwritten in place.

    Returns:
        [rollout packed, prompt packed], each a 1-D bfloat16 tensor of
        :func:`packed_numel` (T * units, H) elements; None where the packed path is unavailable
        (:func:`cpu_brgemm_available` False, CUDA tensors, or an odd H): pass the 2 pieces alone.

    Raises:
        ValueError: not 2 pieces, pieces that are not bf16 [T, units, H], or ``out`` that does not
            match.
    """
    if len(split) != 2:
        raise ValueError(f"pack_first_layer_split: split must hold 2 tensors, got {len(split)}")
    for k, p in enumerate(split):
        if p.dtype != torch.bfloat16 or p.dim() != 3:
            raise ValueError(f"pack_first_layer_split: split[{k}] must be bfloat16 [T, units, H], "
                             f"got {p.dtype} {list(p.shape)}")
    H = split[0].shape[2]
    if (split[0].device.type != "cpu" or H % 2 or not native_available("cpu")
            or not cpu_brgemm_available()):
        return None
    if out is not None and len(out) != 2:
        raise ValueError(f"pack_first_layer_split: out must hold 2 tensors, got {len(out)}")
    result = []
    for k, p in enumerate(split):
        n = packed_numel(p.shape[0] * p.shape[1], p.shape[2])
        buf = out[k] if out is not None else None
        if buf is None:
            buf = torch.empty(n, dtype=torch.bfloat16)
        elif (buf.dtype != torch.bfloat16 or tuple(buf.shape) != (n,) or buf.device.type != "cpu"
              or not buf.is_contiguous()):
            raise ValueError(f"pack_first_layer_split: out[{k}] must be a contiguous bfloat16 "
                             f"[{n}] CPU tensor, got {buf.dtype} {list(buf.shape)} on {buf.device}")
        torch.ops.care_ext._pack_bf16_split(p, buf)
        result.append(buf)
    return result
