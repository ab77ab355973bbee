"""The CPU's float32 first layers on the AVX2 GEMM (csrc/cpu/f32_gemm.cpp, CARE_EXT_CPU_GEMM).

acquisition_step and classifier_forward run their first layers' hidden products on it where
CARE_EXT_CPU_GEMM says avx2 (or auto, on an x86 CPU without AVX-512F at H >= 1024). These tests
force it on every x86 CPU with AVX2 and FMA, so that a machine whose default is MKL still checks it,
and compare with the reference twins and with MKL's path.
"""
from __future__ import annotations

import pytest
import torch
from ops_testutil import (
    R,
    assert_like_torch,
    assert_step_like_reference,
    random_weights,
    run_step,
    step_inputs,
    to64,
)

import care_ext
from care_ext.ops import shared_first_layers

pytestmark = pytest.mark.native

ENV = "CARE_EXT_CPU_GEMM"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


FLAGS = _cpu_flags()
HAS_AVX2 = {"avx2", "fma"} <= FLAGS
needs_avx2 = pytest.mark.skipif(not HAS_AVX2, reason="the CPU has no AVX2 and FMA")


@pytest.fixture
def avx2(monkeypatch):
    monkeypatch.setenv(ENV, "avx2")


def _layout(s1, s2, layout):
    """The weights row-major (as drawn), the first layers side by side (the CARE core's CPU
    layout) or the first layers column-major; the same values."""
    if layout == "shared":
        return shared_first_layers(s1, s2)
    if layout == "columns":
        return tuple([t.t().contiguous().t() if i in (0, 2) else t for i, t in enumerate(s)]
                     for s in (s1, s2))
    return s1, s2


@needs_avx2
@pytest.mark.parametrize("layout", ["rows", "shared", "columns"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("B,G,H,dims", [
    (1, 1, 32, {}), (7, 5, 130, {}), (33, 16, 300, {}), (70, 8, 520, {}),
    (9, 64, 96, {}), (13, 3, 257, {"P": 20, "R1": 7, "R2": 9, "K": 5}),
])
def test_step_on_the_avx2_gemm_is_like_the_reference(B, G, H, dims, dtype, layout, avx2):
    """Rows that are not a multiple of the 6-row tile, hidden sizes over one 256-row slab with a
    remainder, layers narrower than a 16-column panel, every weight layout: the step's outputs
    against the reference (the classifier outputs within twice torch's own float32 error)."""
    gen = torch.Generator().manual_seed(B * 7 + G + H)
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(B, G, H, dtype, gen, **dims)
    w1, w2 = _layout(s1, s2, layout)
    got = run_step("acquisition_step", "cpu", ids, lengths, h_p, h_r, w1, w2)
    assert_step_like_reference(got, ids, lengths, h_p, h_r, s1, s2)


@needs_avx2
def test_avx2_step_bits_follow_neither_threads_nor_blocks_nor_layout(monkeypatch, avx2):
    """The rollout layers' sums have one order per output element, whatever the row's block, the
    blocks' size (CARE_EXT_CPU_SMALL_BLOCKS), the number of threads or the first layers' layout
    (they are packed alike): all outputs of every combination are the same bits. (MKL's path
    does not promise this across block sizes: a block's few Stage-II rows may take another
    kernel.)"""
    gen = torch.Generator().manual_seed(5)
    B, G, H = 70, 8, 300
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(B, G, H, torch.bfloat16, gen)
    before = torch.get_num_threads()
    runs = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for small in ("0", "1"):
                monkeypatch.setenv("CARE_EXT_CPU_SMALL_BLOCKS", small)
                for layout in ("rows", "shared", "columns"):
                    w1, w2 = _layout(s1, s2, layout)
                    runs[threads, small, layout] = run_step("acquisition_step", "cpu", ids,
                                                            lengths, h_p, h_r, w1, w2)
    finally:
        torch.set_num_threads(before)
    first_key, first = next(iter(runs.items()))
    for key, outs in runs.items():
        for name, a, b in zip(R.AcquisitionOutputs._fields, outs, first):
            assert torch.equal(a, b), f"{name}: {key} differs from {first_key}"
    assert_step_like_reference(first, ids, lengths, h_p, h_r, s1, s2)


@needs_avx2
@pytest.mark.parametrize("masked,with_feat", [(False, True), (True, False)])
@pytest.mark.parametrize("B,G,H", [(1, 1, 64), (7, 5, 130), (16, 16, 2048), (3, 8, 4096)])
def test_classifier_forward_on_the_avx2_gemm(B, G, H, masked, with_feat, avx2):
    gen = torch.Generator().manual_seed(B + G + H)
    h_p = torch.randn(B, H, generator=gen).to(torch.bfloat16)
    h_r = torch.randn(B, G, H, generator=gen).to(torch.bfloat16)
    Fp, Fr = G + 1, (1 if with_feat else 0)
    pf = torch.rand(B, Fp, generator=gen)
    rf = torch.rand(B, G, Fr, generator=gen) if with_feat else None
    mask = (torch.rand(B, G, generator=gen) < 0.5) if masked else None
    w = random_weights(H, Fp, Fr, G + 1, gen)
    got = torch.ops.care_ext.classifier_forward(h_p, pf, h_r, rf, mask, w)
    assert_like_torch(got, R.classifier_forward(h_p, pf, h_r, rf, mask, w),
                      R.classifier_forward(h_p, pf, h_r, rf, mask, to64(w)), "logits")


@needs_avx2
def test_avx2_and_mkl_paths_make_the_same_decisions(monkeypatch):
    """CARE_EXT_CPU_GEMM=avx2 and =mkl on the CARE-sized step: integer and bool outputs equal,
    every float output within float32 rounding of the other."""
    gen = torch.Generator().manual_seed(11)
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(64, 8, 1024, torch.bfloat16, gen)
    w1, w2 = shared_first_layers(s1, s2)
    outs = {}
    for v in ("avx2", "mkl"):
        monkeypatch.setenv(ENV, v)
        outs[v] = run_step("acquisition_step", "cpu", ids, lengths, h_p, h_r, w1, w2)
    for name, a, m in zip(R.AcquisitionOutputs._fields, outs["avx2"], outs["mkl"]):
        if a.dtype in (torch.int64, torch.bool):
            assert torch.equal(a, m), name
        else:
            torch.testing.assert_close(a, m, rtol=1e-4, atol=1e-5,
                                       msg=lambda s, name=name: f"{name}: {s}")
    assert_step_like_reference(outs["avx2"], ids, lengths, h_p, h_r, s1, s2)


@needs_avx2
@pytest.mark.parametrize("H", [512, 1024])
def test_auto_takes_the_avx2_gemm_from_hidden_size_1024_where_build_info_says_so(H, monkeypatch):
    """auto (and unset) give the bits of avx2 at H >= 1024 where build_info's cpu_f32_gemm is
    'avx2', else MKL's bits (below 1024 the CPU lab's float order, H = 128, stays MKL's)."""
    gen = torch.Generator().manual_seed(H)
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(5, 4, H, torch.bfloat16, gen)
    outs = {}
    for v in ("avx2", "mkl", "auto"):
        monkeypatch.setenv(ENV, v)
        outs[v] = run_step("acquisition_step", "cpu", ids, lengths, h_p, h_r, s1, s2)
    monkeypatch.delenv(ENV)
    unset = run_step("acquisition_step", "cpu", ids, lengths, h_p, h_r, s1, s2)
    picks = "avx2" if H >= 1024 and care_ext.build_info()["cpu_f32_gemm"] == "avx2" else "mkl"
    i = R.AcquisitionOutputs._fields.index("stage1_logits")
    assert not torch.equal(outs["avx2"][i], outs["mkl"][i])  # the two paths are told apart
    for a, b, u in zip(outs["auto"], outs[picks], unset):
        assert torch.equal(a, b) and torch.equal(u, b)


def test_cpu_gemm_env_is_checked_and_build_info_says_what_auto_picks(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(3, 4, 32, torch.float32, gen)
    monkeypatch.setenv(ENV, "blas")
    with pytest.raises(RuntimeError, match="CARE_EXT_CPU_GEMM must be avx2, mkl or auto, got 'blas'"):
        run_step("acquisition_step", "cpu", ids, lengths, h_p, h_r, s1, s2)
    for value in ("mkl", "auto", ""):
        monkeypatch.setenv(ENV, value)
        run_step("acquisition_step", "cpu", ids, lengths, h_p, h_r, s1, s2)
    if not HAS_AVX2:
        monkeypatch.setenv(ENV, "avx2")
        with pytest.raises(RuntimeError, match="has no AVX2 and FMA"):
            run_step("acquisition_step", "cpu", ids, lengths, h_p, h_r, s1, s2)
    assert care_ext.build_info()["cpu_f32_gemm_min_hidden"] == 1024  # what the H test below uses
    want = "avx2" if HAS_AVX2 and "avx512f" not in FLAGS else "mkl"
    if FLAGS:  # /proc/cpuinfo read: Linux
        assert care_ext.build_info()["cpu_f32_gemm"] == want
    else:
        assert care_ext.build_info()["cpu_f32_gemm"] in ("avx2", "mkl")
