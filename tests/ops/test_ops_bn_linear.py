"""The fused BatchNorm -> Linear training layer's private CPU ops (csrc/cpu/bn_linear.cpp):
care_ext::_bn_linear_forward and _bn_linear_backward against their twins
care_ext.reference.bn_linear_forward / bn_linear_backward.

Under CARE_EXT_CPU_GEMM=avx2 (forced on every x86 CPU with AVX2 and FMA, so that a machine whose
default is MKL still checks it) they multiply on care_ext's AVX2 GEMM: compared with the twin in
float64 to float32 rounding. Under CARE_EXT_CPU_GEMM=mkl they run the twin's ATen calls: the same
bits as the twin. The AVX2 path's bits do not depend on the thread count.
"""
from __future__ import annotations

import pytest
import torch
from ops_testutil import R

pytestmark = pytest.mark.native

ENV = "CARE_EXT_CPU_GEMM"
HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
needs_avx2 = pytest.mark.skipif(not HAS_AVX2, reason="the CPU has no AVX2 and FMA")


def _layer(N, O, widths, seed=0, strided=False):
    """Normalised-looking blocks, a Linear's weight and bias and BatchNorm's gamma / beta, and an
    output gradient; ``strided``: the first block a column-major view (the op copies it)."""
    g = torch.Generator().manual_seed(seed)
    D = sum(widths)
    xhat = [torch.randn(N, d, generator=g) for d in widths]
    if strided:
        xhat[0] = xhat[0].t().contiguous().t()
    w = torch.randn(O, D, generator=g) / D ** 0.5
    b, gamma = torch.randn(O, generator=g), torch.rand(D, generator=g) + 0.5
    beta, grad = torch.randn(D, generator=g), torch.randn(N, O, generator=g)
    return xhat, w, b, gamma, beta, grad


def _native(xhat, w, b, gamma, beta, grad):
    out = torch.ops.care_ext._bn_linear_forward(xhat, w, b, gamma, beta)
    return (out, *torch.ops.care_ext._bn_linear_backward(grad, xhat, w, gamma, beta))


def _twin(xhat, w, b, gamma, beta, grad, dtype=None):
    c = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    xhat, w, b, gamma, beta, grad = ([c(x) for x in xhat], c(w), c(b), c(gamma), c(beta), c(grad))
    out = R.bn_linear_forward(xhat, w, b, gamma, beta)
    return (out, *R.bn_linear_backward(grad, xhat, w, gamma, beta))


NAMES = ("out", "grad_weight", "grad_bias", "grad_gamma", "grad_beta")
SHAPES = [  # N, O, block widths: the classifiers' first layers, and edges of the panel loops
    (232, 64, [4096, 1]),     # Stage-I rollouts at 64x8x4096 (h_resp | length)
    (29, 128, [4096, 9]),     # a prompt layer (h_prompt | 1 + G features)
    (102, 64, [4096]),        # Stage-II rollouts (no feature)
    (600, 20, [1030, 7, 21]),  # three slabs of rows, O off the 16-column panel, three blocks
    (1, 5, [40]),             # one row, one short panel
    (0, 16, [300, 3]),        # no rows: zero gradients, an empty output
]


@needs_avx2
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("N,O,widths", SHAPES)
def test_bn_linear_ops_on_the_avx2_gemm_match_the_twin(N, O, widths, strided, monkeypatch):
    monkeypatch.setenv(ENV, "avx2")
    args = _layer(N, O, widths, seed=N + O, strided=strided)
    got = _native(*args)
    ref = _twin(*args, dtype=torch.float64)
    assert got[0].shape == (N, O) and got[0].is_contiguous()
    for name, a, r in zip(NAMES, got, ref):
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        scale = float(r.abs().max()) if r.numel() else 1.0
        torch.testing.assert_close(a.double(), r, rtol=0, atol=2e-6 * max(scale, 1e-3),
                                   msg=lambda m, nm=name: f"{nm}: {m}")
    if N == 0:
        assert all(bool((t == 0).all()) for t in got[1:])
    else:  # the gradients are not trivially zero
        assert all(float(t.abs().max()) > 0 for t in got[1:])


@pytest.mark.parametrize("N,O,widths", SHAPES[:3] + SHAPES[4:])
def test_bn_linear_ops_under_mkl_are_the_twin_bit_for_bit(N, O, widths, monkeypatch):
    """Where the CPU step keeps MKL the ops run the twin's ATen calls in its order."""
    monkeypatch.setenv(ENV, "mkl")
    args = _layer(N, O, widths, seed=3)
    for name, a, r in zip(NAMES, _native(*args), _twin(*args)):
        assert torch.equal(a, r), name


@needs_avx2
def test_bn_linear_ops_on_the_avx2_gemm_do_not_depend_on_the_thread_count(monkeypatch):
    monkeypatch.setenv(ENV, "avx2")
    args = _layer(300, 70, [2100, 5], seed=11)
    before = torch.get_num_threads()
    try:
        runs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            runs.append(_native(*args))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for name, a, b in zip(NAMES, runs[0], other):
            assert torch.equal(a, b), name


@needs_avx2
def test_bn_linear_ops_carry_non_finite_values(monkeypatch):
    """A NaN in the output gradient reaches the gradients it touches, as the twin's do (the
    trainer then skips the step), and nothing else."""
    monkeypatch.setenv(ENV, "avx2")
    xhat, w, _, gamma, beta, grad = _layer(40, 16, [1024], seed=5)
    grad[3, 7] = float("nan")
    got = torch.ops.care_ext._bn_linear_backward(grad, xhat, w, gamma, beta)
    ref = R.bn_linear_backward(grad, xhat, w, gamma, beta)
    for name, a, r in zip(NAMES[1:], got, ref):
        assert torch.equal(a.isnan(), r.isnan()), name
    assert bool(got[0][7].isnan().all()) and not bool(got[0][6].isnan().any())


def test_bn_linear_ops_check_their_arguments():
    xhat, w, b, gamma, beta, grad = _layer(6, 4, [10, 2])
    fwd, bwd = torch.ops.care_ext._bn_linear_forward, torch.ops.care_ext._bn_linear_backward
    with pytest.raises(RuntimeError, match="columns wide"):
        fwd([xhat[0]], w, b, gamma, beta)
    with pytest.raises(RuntimeError, match="float32"):
        fwd([x.double() for x in xhat], w, b, gamma, beta)
    with pytest.raises(RuntimeError, match="rows"):
        fwd([xhat[0], xhat[1][:3]], w, b, gamma, beta)
    with pytest.raises(RuntimeError, match="bias"):
        fwd(xhat, w, b[:3], gamma, beta)
    with pytest.raises(RuntimeError, match="gamma and beta"):
        fwd(xhat, w, b, gamma[:5], beta)
    with pytest.raises(RuntimeError, match="at least one block"):
        bwd(grad, [], w, gamma, beta)
    with pytest.raises(RuntimeError, match="grad_out"):
        bwd(grad[:, :3], xhat, w, gamma, beta)


def test_bn_linear_ops_opcheck():
    """Schemas, fake kernels and (for the forward) autograd registration as torch.library
    checks them."""
    from torch.library import opcheck

    xhat, w, b, gamma, beta, grad = _layer(9, 20, [1030, 3], seed=2)
    opcheck(torch.ops.care_ext._bn_linear_forward.default, (xhat, w, b, gamma, beta))
    opcheck(torch.ops.care_ext._bn_linear_backward.default, (grad, xhat, w, gamma, beta))
