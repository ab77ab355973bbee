"""The CPU step on float32 weights packed once for the AVX2 GEMM (csrc/cpu/f32_step_pack.cpp:
care_ext::_pack_f32_step and care_ext::_acquisition_step_f32_packed; care_ext.ops.
pack_cpu_step_weights).

The packed step must give the per-call packing's bits (same panels, same sums), on every x86 CPU
with AVX2 and FMA whatever CARE_EXT_CPU_GEMM says, and refuse a buffer of the wrong size, dtype or
alignment with a message that says what it wanted.
"""
from __future__ import annotations

import pytest
import torch
from ops_testutil import R, assert_step_like_reference, run_step, step_inputs
from test_ops_f32_gemm import HAS_AVX2, _layout, needs_avx2

from care_ext import ops

pytestmark = pytest.mark.native

ENV = "CARE_EXT_CPU_GEMM"


def _packed_step(ids, lengths, h_p, h_r, s1, s2, packed):
    return torch.ops.care_ext._acquisition_step_f32_packed(
        ids, lengths, h_p, h_r, list(s1), list(s2), 4000.0, 0.0, False, 1e-6, False, packed)


def _pack(s1, s2, H):
    out = torch.empty(ops.cpu_step_packed_numel(s1, s2, H))
    torch.ops.care_ext._pack_f32_step(list(s1), list(s2), out)
    return out


def _assert_same_bits(got, want, what=""):
    for name, a, b in zip(R.AcquisitionOutputs._fields, got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name} {what}"


@needs_avx2
@pytest.mark.parametrize("layout", ["rows", "shared", "columns"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("B,G,H,dims", [
    (0, 4, 64, {}), (1, 1, 32, {}), (7, 5, 130, {}), (33, 16, 300, {}), (9, 64, 96, {}),
    (13, 3, 257, {"P": 20, "R1": 7, "R2": 9, "K": 5}), (64, 8, 1024, {}),
])
def test_packed_step_is_the_per_call_step_bit_for_bit(B, G, H, dims, dtype, layout, monkeypatch):
    """An empty batch, rows off the 6-row tile, hidden sizes over one 256-row slab with a
    remainder, layers narrower than a panel (P, R1, R2, K not multiples of 16), every weight
    layout: the packed step's ten outputs are the per-call AVX2 step's bits, and like the
    reference."""
    monkeypatch.setenv(ENV, "avx2")
    gen = torch.Generator().manual_seed(B * 3 + G + H)
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(B, G, H, dtype, gen, **dims)
    w1, w2 = _layout(s1, s2, layout)
    want = run_step("acquisition_step", "cpu", ids, lengths, h_p, h_r, w1, w2)
    got = _packed_step(ids, lengths, h_p, h_r, w1, w2, _pack(w1, w2, H))
    _assert_same_bits(got, want)
    assert_step_like_reference(got, ids, lengths, h_p, h_r, s1, s2)


@needs_avx2
def test_packed_step_ignores_the_gemm_env_and_follows_no_thread_count(monkeypatch):
    """With CARE_EXT_CPU_GEMM=mkl the plain step runs MKL (other bits); the packed step runs the
    AVX2 GEMM anyway, with the same bits on 1, 2 and 3 threads and with and without small blocks."""
    gen = torch.Generator().manual_seed(8)
    B, G, H = 70, 8, 300
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(B, G, H, torch.bfloat16, gen)
    packed = _pack(s1, s2, H)
    monkeypatch.setenv(ENV, "avx2")
    want = run_step("acquisition_step", "cpu", ids, lengths, h_p, h_r, s1, s2)
    monkeypatch.setenv(ENV, "mkl")
    mkl = run_step("acquisition_step", "cpu", ids, lengths, h_p, h_r, s1, s2)
    i = R.AcquisitionOutputs._fields.index("stage1_logits")
    assert not torch.equal(mkl[i], want[i])  # the two GEMMs are told apart
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for small in ("0", "1"):
                monkeypatch.setenv("CARE_EXT_CPU_SMALL_BLOCKS", small)
                got = _packed_step(ids, lengths, h_p, h_r, s1, s2, packed)
                _assert_same_bits(got, want, f"threads={threads} small={small}")
    finally:
        torch.set_num_threads(before)


@needs_avx2
def test_pack_lays_out_16_column_panels_of_256_row_slabs():
    """The first section, both stages' rollout first layers (hidden columns, W^T [H, R1]): slab s
    of panel q holds W^T[256 s + k, 16 q + j] at 256 s * 16 * panels + q * kc * 16 + 16 k + j,
    zeros past a group's width, Stage-I's panels first."""
    gen = torch.Generator().manual_seed(3)
    H, R1 = 300, 20  # two slabs (256 + 44), two panels per stage (16 + 4 columns)
    _, _, _, _, s1, s2 = step_inputs(2, 3, H, torch.float32, gen, R1=R1)
    packed = _pack(s1, s2, H)
    cols = []
    for w in (s1, s2):
        wt = w[2][:, :H].t()  # [H, R1]
        cols.append(torch.nn.functional.pad(wt, (0, 32 - R1)))  # 2 panels, zero padding
    full = torch.cat(cols, 1)  # [H, 4 panels * 16]
    np_ = full.shape[1] // 16
    want = []
    for k0 in (0, 256):
        kc = min(256, H - k0)
        for q in range(np_):
            want.append(full[k0:k0 + kc, 16 * q:16 * q + 16].reshape(-1))
    want = torch.cat(want)
    assert torch.equal(packed[:want.numel()], want)


@needs_avx2
def test_packed_buffer_is_checked():
    gen = torch.Generator().manual_seed(4)
    H = 64
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(3, 4, H, torch.bfloat16, gen)
    packed = _pack(s1, s2, H)
    n = packed.numel()
    with pytest.raises(RuntimeError, match=f"holds {n - 16} floats; these weights pack into {n}"):
        _packed_step(ids, lengths, h_p, h_r, s1, s2, packed[:-16].clone())
    with pytest.raises(RuntimeError, match="must be 32-byte aligned"):
        _packed_step(ids, lengths, h_p, h_r, s1, s2, torch.empty(n + 1)[1:])
    with pytest.raises(RuntimeError, match="contiguous 1-D float32 CPU tensor"):
        _packed_step(ids, lengths, h_p, h_r, s1, s2, packed.double())
    with pytest.raises(RuntimeError, match="contiguous 1-D float32 CPU tensor"):
        _packed_step(ids, lengths, h_p, h_r, s1, s2, packed.view(-1, 16))
    with pytest.raises(RuntimeError, match="holds"):
        torch.ops.care_ext._pack_f32_step(list(s1), list(s2), torch.empty(n - 16))
    bad = list(s2)
    bad[4] = bad[4][:, :-1]  # resp2_w [R2, R1 - 1]
    with pytest.raises(RuntimeError, match=r"stage2\[4\] \(resp2_w\) must have shape"):
        torch.ops.care_ext._pack_f32_step(list(s1), bad, torch.empty(n))
    with pytest.raises(RuntimeError, match="must hold 10 tensors each"):
        torch.ops.care_ext._pack_f32_step(list(s1), list(s2)[:9], torch.empty(n))


@needs_avx2
def test_a_stale_packing_is_what_the_step_multiplies(monkeypatch):
    """The contract the core keeps (re-pack after every change): the step multiplies the packed
    weights, not the ones passed beside them, so a stale packing shows in the logits."""
    monkeypatch.setenv(ENV, "avx2")
    gen = torch.Generator().manual_seed(6)
    H = 64
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(4, 4, H, torch.bfloat16, gen)
    packed = _pack(s1, s2, H)
    s1b = [w.clone() for w in s1]
    s1b[0] = s1b[0] * 2  # prompt_w changed after packing
    stale = _packed_step(ids, lengths, h_p, h_r, s1b, s2, packed)
    fresh = _packed_step(ids, lengths, h_p, h_r, s1b, s2, _pack(s1b, s2, H))
    i = R.AcquisitionOutputs._fields.index("stage1_logits")
    assert not torch.equal(stale[i], fresh[i])
    _assert_same_bits(fresh, run_step("acquisition_step", "cpu", ids, lengths, h_p, h_r, s1b, s2))


@needs_avx2
def test_pack_cpu_step_weights_and_the_public_step(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    H = 1024
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(6, 4, H, torch.bfloat16, gen)
    monkeypatch.setenv(ENV, "mkl")
    assert ops.pack_cpu_step_weights(s1, s2, H) is None  # the step does not pack there
    monkeypatch.setenv(ENV, "avx2")
    packed = ops.pack_cpu_step_weights(s1, s2, H)
    assert packed.dtype == torch.float32 and packed.numel() == ops.cpu_step_packed_numel(s1, s2, H)
    again = ops.pack_cpu_step_weights(s1, s2, H, out=packed)
    assert again.data_ptr() == packed.data_ptr()  # the buffer is reused
    wrong = ops.pack_cpu_step_weights(s1, s2, H, out=torch.empty(5))
    assert torch.equal(wrong, packed)  # a buffer of another size is replaced
    args = (ids, lengths, h_p, h_r, s1, s2)
    _assert_same_bits(ops.acquisition_step(*args, packed_weights=packed), ops.acquisition_step(*args))
    with pytest.raises(ValueError, match="not both"):
        ops.acquisition_step(*args, packed_weights=packed, first_layer_split=[packed])


@needs_avx2
def test_the_fused_step_env_routes_a_packed_call_too(monkeypatch):
    """CARE_EXT_FUSED_STEP=1 sends care_ext.ops.acquisition_step to the fused op with or without
    packed_weights: a decide packed ('on') and one not ('off') then take the same route and give
    the same bits (the core's pack tests run under that switch in bench/gpu_check.sh). Unset, the
    packed call runs the packed op."""
    gen = torch.Generator().manual_seed(11)
    H = 1024
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(6, 4, H, torch.bfloat16, gen)
    monkeypatch.setenv(ENV, "avx2")
    packed = ops.pack_cpu_step_weights(s1, s2, H)
    args = (ids, lengths, h_p, h_r, s1, s2)
    fused = torch.ops.care_ext._acquisition_step_fused(*args, 4000.0, 0.0, False, 1e-6, False)
    plain = _packed_step(*args, packed)
    i = R.AcquisitionOutputs._fields.index("stage1_logits")
    assert not torch.equal(fused[i], plain[i])  # two summation orders: the route is observable
    monkeypatch.setenv("CARE_EXT_FUSED_STEP", "1")
    _assert_same_bits(ops.acquisition_step(*args, packed_weights=packed), fused, "packed")
    _assert_same_bits(ops.acquisition_step(*args), fused, "not packed")
    monkeypatch.delenv("CARE_EXT_FUSED_STEP")
    _assert_same_bits(ops.acquisition_step(*args, packed_weights=packed), plain, "unset")


def test_without_avx2_nothing_is_packed(monkeypatch):
    """Where the CPU has no AVX2 the step never packs (auto and mkl) and the op says why."""
    if HAS_AVX2:
        pytest.skip("this CPU has AVX2: covered by the tests above")
    gen = torch.Generator().manual_seed(9)
    *_, s1, s2 = step_inputs(3, 4, 1024, torch.bfloat16, gen)
    assert ops.pack_cpu_step_weights(s1, s2, 1024) is None
    with pytest.raises(RuntimeError, match="has no AVX2 and FMA"):
        _pack(s1, s2, 1024)


@needs_avx2
def test_opcheck_packed_ops():
    """torch.library.opcheck (schema, fake tensors, AOT dispatch) on both ops."""
    gen = torch.Generator().manual_seed(10)
    H = 48
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(3, 4, H, torch.bfloat16, gen)
    out = torch.empty(ops.cpu_step_packed_numel(s1, s2, H))
    torch.library.opcheck(torch.ops.care_ext._pack_f32_step.default, (list(s1), list(s2), out))
    packed = _pack(s1, s2, H)  # opcheck may have written a clone: the step needs a real packing
    torch.library.opcheck(torch.ops.care_ext._acquisition_step_f32_packed.default,
                          (ids, lengths, h_p, h_r, list(s1), list(s2), 4000.0, 0.0, False, 1e-6,
                           False, packed))
