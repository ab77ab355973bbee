"""The split-bf16 first layers (care_ext.bf16_split + ``first_layer_split``): the pieces
reconstruct the weights to the stated bound, and both steps on them -- the fused step (CPU: the
same products in float32; CUDA: bf16 tensor-core GEMMs with float32 accumulation) and the CPU
step ``_acquisition_step_split`` (MKL's bf16 x bf16 -> float32 GEMM where torch exports it) --
match the float64 composition as tightly as the float32 path does."""
from __future__ import annotations

import pytest
import torch

from care_ext.bf16_split import first_layer_split, split_bf16
from ops_testutil import (R, assert_step_like_reference, random_weights, run_step, step_inputs,
                          to64)

pytestmark = pytest.mark.native


@pytest.mark.parametrize("terms,bound", [(1, 2.0 ** -8), (2, 2.0 ** -16), (3, 2.0 ** -24)])
def test_split_reconstructs_within_bound(terms, bound):
    gen = torch.Generator().manual_seed(terms)
    w = torch.randn(300, 257, generator=gen) * torch.logspace(-20, 20, 257, base=2.0)
    w[0, :4] = torch.tensor([0.0, -0.0, 1.0, -3.0])
    p = split_bf16(w, terms)
    assert p.dtype == torch.bfloat16 and p.shape == (terms, *w.shape)
    back = p.double().sum(0)
    rel = ((back - w.double()).abs() / w.double().abs().clamp_min(1e-300)).max().item()
    assert rel <= bound, rel
    if terms > 1:  # the last piece carries what the earlier ones left: removing it is worse
        worse = p[:-1].double().sum(0)
        assert ((worse - w.double()).abs() / w.double().abs().clamp_min(1e-300)).max() > bound


def test_split_rejects_bad_input():
    with pytest.raises(ValueError, match="float32"):
        split_bf16(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="terms"):
        split_bf16(torch.ones(3), 4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        split_bf16(torch.tensor([1.0, float("inf")]))
    w = random_weights(16, 3, 1, 2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="10 folded"):
        first_layer_split(w[:9], w, 16)
    with pytest.raises(ValueError, match="H = 32"):
        first_layer_split(w, w, 32)


def _bits(t):
    return t.view(torch.int16)


def _hard_weights(R, H, seed):
    """float32 [R, H] over 2^-140 .. 2^120 (bf16 subnormals included), with zeros, -0, exact bf16
    values, halfway cases of the first rounding and bf16's largest finite value."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(R, H, generator=gen) * torch.pow(
        2.0, torch.randint(-140, 120, (R, H), generator=gen).float())
    flat = w.view(-1)
    flat[:6] = torch.tensor([0.0, -0.0, 1.0, -3.0, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8])
    flat[6:8] = torch.tensor([3.3895314e38, -3.3895314e38])
    return w


@pytest.mark.parametrize("terms", [1, 2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "column_slice", "transposed"])
def test_native_split_equals_reference_bit_for_bit(terms, layout):
    """care_ext::_split_bf16 against its torch twin (care_ext.reference.split_bf16): the same
    pieces, bit for bit, from any strides into a slice of a larger buffer."""
    from care_ext import reference
    w = _hard_weights(67, 131, seed=terms)
    if layout == "column_slice":  # a folded weight's hidden columns
        w = torch.cat([w, torch.ones(67, 5)], 1)[:, :131]
    elif layout == "transposed":
        w = w.t().contiguous().t()
    big = torch.zeros(terms, 100, 131, dtype=torch.bfloat16)
    out = big[:, 20:87]  # rows of a stacked buffer: strided over terms
    torch.ops.care_ext._split_bf16(w, terms, out)
    want = torch.empty(terms, 67, 131, dtype=torch.bfloat16)
    reference.split_bf16(w, terms, want)
    assert torch.equal(_bits(out), _bits(want))
    assert not big[:, :20].any() and not big[:, 87:].any()  # nothing written outside the slice


def test_native_split_writes_a_strided_output():
    from care_ext import reference
    w = _hard_weights(33, 40, seed=7)
    out = torch.empty(3, 40, 33, dtype=torch.bfloat16).transpose(1, 2)  # inner stride 33
    torch.ops.care_ext._split_bf16(w, 3, out)
    want = torch.empty(3, 33, 40, dtype=torch.bfloat16)
    reference.split_bf16(w, 3, want)
    assert torch.equal(_bits(out.contiguous()), _bits(want))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 3.4028234e38,
                                 -3.3962e38])
def test_native_split_rejects_non_finite_weights(bad):
    """NaN, Inf, and finite weights whose first bf16 piece rounds to infinity (their pieces would
    sum to NaN): a ValueError from the op, from the wrapper and from the reference."""
    from care_ext import reference
    w = torch.randn(64, 300)
    w[50, 299] = bad  # the last thread's rows, the last column
    with pytest.raises(ValueError, match="NaN or Inf"):
        torch.ops.care_ext._split_bf16(w, 3, torch.empty(3, 64, 300, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="NaN or Inf"):
        split_bf16(w)
    for terms in (1, 2, 3):
        with pytest.raises(ValueError, match="NaN or Inf"):
            reference.split_bf16(w, terms, torch.empty(terms, 64, 300, dtype=torch.bfloat16))


def test_native_split_argument_errors():
    w = torch.randn(4, 8)
    op = torch.ops.care_ext._split_bf16
    with pytest.raises(RuntimeError, match="out must be bfloat16"):
        op(w, 3, torch.empty(2, 4, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="out must be bfloat16"):
        op(w, 3, torch.empty(3, 4, 8))
    with pytest.raises(RuntimeError, match="float32"):
        op(w.double(), 3, torch.empty(3, 4, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="terms"):
        op(w, 4, torch.empty(4, 4, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be bfloat16"):
        split_bf16(w, 3, out=torch.empty(3, 8, 4, dtype=torch.bfloat16))


def test_first_layer_split_reuses_its_buffers(device):
    """``out=`` writes the pieces of new weights into an earlier result's buffers: the same values
    as a fresh split, the same storage."""
    gen = torch.Generator().manual_seed(5)
    w1, w2 = (random_weights(48, 9, 1, 3, gen), random_weights(48, 9, 0, 3, gen))
    w1, w2 = [t.to(device) for t in w1], [t.to(device) for t in w2]
    first = first_layer_split(w1, w2, 48)
    ptrs = [p.data_ptr() for p in first]
    v1, v2 = ([t * 1.5 for t in w1], [t - 0.25 for t in w2])
    again = first_layer_split(v1, v2, 48, out=first)
    assert [p.data_ptr() for p in again] == ptrs
    for got, want in zip(again, first_layer_split(v1, v2, 48)):
        assert torch.equal(_bits(got), _bits(want))
    with pytest.raises(ValueError, match="out must hold 2"):
        first_layer_split(v1, v2, 48, out=first[:1])
    with pytest.raises(ValueError, match=r"out\[1\] must be a contiguous bfloat16"):
        first_layer_split(v1, v2, 48, terms=2, out=[first[0][:2], first[1]])


def _inputs(B, G, H, seed):
    return step_inputs(B, G, H, torch.bfloat16, torch.Generator().manual_seed(seed))


SPLIT_OPS = ["_acquisition_step_fused_split", "_acquisition_step_split"]
"""The ops that take first_layer_split; _acquisition_step_split has a CPU kernel only."""


def _skip_cpu_only(op, device):
    if op == "_acquisition_step_split" and torch.device(device).type != "cpu":
        pytest.skip("_acquisition_step_split has a CPU kernel only")


def _run(device, ids, lengths, h_p, h_r, s1, s2, split, op="_acquisition_step_fused_split"):
    return run_step(op, device, ids, lengths, h_p, h_r, s1, s2, split)


@pytest.mark.parametrize("op", SPLIT_OPS)
@pytest.mark.parametrize("B,G,H", [(0, 8, 64), (1, 1, 32), (7, 5, 130), (64, 8, 256),
                                   (33, 16, 130), (5, 64, 64), (3, 8, 4096), (70, 8, 96)])
def test_split_step_matches_composition(device, B, G, H, op):
    _skip_cpu_only(op, device)
    ids, lengths, h_p, h_r, s1, s2 = _inputs(B, G, H, B * G + H)
    got = _run(device, ids, lengths, h_p, h_r, s1, s2, first_layer_split(s1, s2, H), op)
    assert_step_like_reference(got, ids, lengths, h_p, h_r, s1, s2)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_split_step_reads_strided_states_and_any_thread_count(threads):
    """_acquisition_step_split multiplies the bf16 rows in place: a strided view of the hidden
    states (rows 2H apart, NaN between them) gives the reference's results, on 1-3 threads
    (4 blocks: several per thread, or blocks one after the other with BLAS threads), with
    Stage-I's and Stage-II's weights in the core's shared CPU layout."""
    import care_ext.ops as ops

    B, G, H = 100, 8, 64
    ids, lengths, h_p, h_r, s1, s2 = _inputs(B, G, H, 5)
    wide = torch.full((B, G, 2 * H), float("nan"), dtype=torch.bfloat16)
    wide[..., :H] = h_r
    view = wide[..., :H]
    assert view.stride() == (G * 2 * H, 2 * H, 1)
    w1, w2 = ops.shared_first_layers(s1, s2)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run_step("_acquisition_step_split", "cpu", ids, lengths, h_p, view, w1, w2,
                       first_layer_split(s1, s2, H))
    finally:
        torch.set_num_threads(old)
    assert_step_like_reference(got, ids, lengths, h_p, h_r, s1, s2)


def test_build_info_says_whether_the_cpu_bf16_gemm_is_there():
    """build_info's cpu_bf16_gemm is true exactly when this torch exports MKL's bf16 GEMM (the
    library declares it weak: a torch without it still loads care_ext, with float32 products)."""
    import ctypes
    import json
    import os

    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    exported = hasattr(lib, "cblas_gemm_bf16bf16f32")
    assert json.loads(torch.ops.care_ext.build_info())["cpu_bf16_gemm"] is exported


@pytest.mark.parametrize("op", SPLIT_OPS)
def test_split_terms_trade_accuracy(device, op):
    """Fewer pieces: larger error against float64, in the order the bounds say (1 piece is bf16
    weights, visibly off; 3 pieces are as close as the float32 path)."""
    _skip_cpu_only(op, device)
    B, G, H = 48, 8, 1024
    ids, lengths, h_p, h_r, s1, s2 = _inputs(B, G, H, 11)
    ref64 = R.acquisition_step(ids, lengths, h_p, h_r, to64(s1), to64(s2), 4000.0, 0.0, False,
                               1e-6, False)
    i = R.AcquisitionOutputs._fields.index("stage1_logits")
    errs = []
    for terms in (1, 2, 3):
        out = _run(device, ids, lengths, h_p, h_r, s1, s2, first_layer_split(s1, s2, H, terms),
                   op)
        errs.append((out[i].cpu().double() - ref64[i].double()).abs().max().item())
    plain = run_step("acquisition_step", device, ids, lengths, h_p, h_r, s1, s2)
    err_plain = (plain[i].cpu().double() - ref64[i].double()).abs().max().item()
    assert errs[0] > 10 * errs[2] and errs[0] > errs[1] >= errs[2] * 0.5
    assert errs[2] <= 2 * err_plain + 1e-6, (errs, err_plain)


@pytest.mark.parametrize("op", SPLIT_OPS)
def test_split_argument_errors(device, op):
    _skip_cpu_only(op, device)
    B, G, H = 4, 8, 32
    ids, lengths, h_p, h_r, s1, s2 = _inputs(B, G, H, 2)
    split = first_layer_split(s1, s2, H)
    cases = [
        (dict(h_r=h_r.float()), split, "needs bfloat16 hidden states"),
        ({}, split[:1], "must hold 2 tensors"),
        ({}, [split[0].float(), split[1]], r"first_layer_split\[0\] \(rollout\) must be a bfloat16"),
        ({}, [split[0], split[1][:, :-1]], r"first_layer_split\[1\] \(prompt\) must be a bfloat16"),
        ({}, [split[0], split[1][:2]], "same number of terms"),
    ]
    for over, sp, msg in cases:
        kw = dict(ids=ids, lengths=lengths, h_p=h_p, h_r=h_r, s1=s1, s2=s2)
        kw.update(over)
        with pytest.raises(RuntimeError, match=msg) as err:
            _run(device, **kw, split=sp, op=op)
        assert f"care_ext.{op}:" in str(err.value)  # the op that was called


def test_public_wrapper_passes_the_split_to_the_fused_op(device):
    """care_ext.ops.acquisition_step(first_layer_split=...) (what the core calls with
    CareConfig.first_layer_gemm) runs the split op of the device -- the CPU step on the CPU, the
    fused one on CUDA --, not the float32 one."""
    import care_ext.ops as ops

    ids, lengths, h_p, h_r, s1, s2 = _inputs(24, 8, 96, 4)
    split = first_layer_split(s1, s2, 96, 1)  # 1 piece: visibly different from float32
    d = lambda ts: [t.to(device) for t in ts]  # noqa: E731
    args = (ids.to(device), lengths.to(device), h_p.to(device), h_r.to(device), d(s1), d(s2))
    got = ops.acquisition_step(*args, first_layer_split=d(split))
    op = "_acquisition_step_split" if device == "cpu" else "_acquisition_step_fused_split"
    want = _run(device, ids, lengths, h_p, h_r, s1, s2, split, op)
    plain = ops.acquisition_step(*args)
    i = R.AcquisitionOutputs._fields.index("stage1_logits")
    assert torch.equal(got[i], want[i]) and not torch.equal(got[i], plain[i])


@pytest.mark.parametrize("layout", ["rows", "a transposed", "b transposed", "both strided"])
@pytest.mark.parametrize("M,K,N", [(37, 96, 20), (1, 5, 3), (200, 4096, 192)])
def test_bf16_mm_is_the_exact_products_summed_in_float32(layout, M, K, N):
    """care_ext::_bf16_mm (the split training route's GEMM): every operand layout MKL can read
    in place, and strided ones it copies, give bf16 x bf16 products summed in float32: within a
    float32 sum's rounding of the float64 product."""
    gen = torch.Generator().manual_seed(M + K + N)
    a = torch.randn(M, K, generator=gen).bfloat16()
    b = torch.randn(K, N, generator=gen).bfloat16() * 3
    if layout == "a transposed":
        a = a.t().contiguous().t()
    elif layout == "b transposed":
        b = b.t().contiguous().t()
    elif layout == "both strided":
        a = torch.cat([a, a], 1)[:, ::2]
        b = torch.cat([b, b], 0)[::2]
    got = torch.ops.care_ext._bf16_mm(a, b)
    want = a.double() @ b.double()
    assert got.dtype == torch.float32 and got.shape == (M, N)
    scale = (a.double().abs() @ b.double().abs()).clamp(min=1e-30)
    assert float(((got.double() - want).abs() / scale).max()) < K * 2**-23


def test_bf16_mm_and_column_stats_argument_errors():
    x = torch.randn(4, 6).bfloat16()
    with pytest.raises(RuntimeError, match="a \\[M, K\\] and b \\[K, N\\]"):
        torch.ops.care_ext._bf16_mm(x, x)
    with pytest.raises(RuntimeError, match="must be bfloat16"):
        torch.ops.care_ext._bf16_mm(x.float(), x.t())
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        torch.ops.care_ext._column_stats(x.double())
    with pytest.raises(RuntimeError, match="at least one row"):
        torch.ops.care_ext._column_stats(x[:0])
    with pytest.raises(RuntimeError, match="\\[N, D\\]"):
        torch.ops.care_ext._column_stats(x[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,D", [(1, 3), (2, 64), (37, 130), (1920, 200)])
def test_column_stats_match_float64(dtype, N, D):
    """care_ext::_column_stats: per-column mean and biased variance within a few float32
    roundings of the float64 values (the mean to 2^-22 of |mean| + std, the variance to 4e-6
    relative), also for columns whose mean is 1e4 times their spread (the shifted sums keep the
    variance) and for a strided view."""
    gen = torch.Generator().manual_seed(N * D)
    x = torch.randn(N, D, generator=gen) * torch.linspace(0.01, 3, D)
    x[:, ::3] += 1e3  # large means
    x = torch.cat([x, x], 1)[:, ::2].to(dtype)  # a strided view: copied
    mean, var = torch.ops.care_ext._column_stats(x)
    xd = x.double()
    want_mean, want_var = xd.mean(0), xd.var(0, unbiased=False)
    assert mean.dtype == var.dtype == torch.float32
    scale = want_mean.abs() + want_var.sqrt()
    assert float(((mean.double() - want_mean).abs() / scale.clamp(min=1e-30)).max()) < 2**-22
    torch.testing.assert_close(var.double(), want_var, rtol=4e-6, atol=1e-12)
