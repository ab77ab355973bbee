"""care_ext::_copy_into (StepGraph's one-call input copy) against its twin, dst[i].copy_(src[i])
(care_ext.reference.copy_into), on every device with native kernels."""
from __future__ import annotations

import pytest
import torch

import care_ext  # noqa: F401  (loads the library)
from care_ext import ops, reference

pytestmark = pytest.mark.native

DTYPES = (torch.int64, torch.int32, torch.bfloat16, torch.float32, torch.bool, torch.uint8)


def _random(shape, dtype, gen):
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) < 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(0, 200, shape, generator=gen).to(dtype)


def _pairs(specs, device, gen):
    """(dst, src) lists: dst filled with -1 (or False), src random; spec = (shape, dtype, kind),
    kind "plain", "offset" (src a view 1 element into a larger tensor: not 16-byte aligned) or
    "strided" (src a transposed view: torch's copy)."""
    dst, src = [], []
    for shape, dtype, kind in specs:
        d = torch.full(shape, -1, dtype=dtype) if dtype != torch.bool else torch.zeros(shape,
                                                                                          dtype=dtype)
        if kind == "offset":
            n = int(torch.tensor(shape).prod()) if shape else 1
            s = _random((n + 1,), dtype, gen)[1:].reshape(shape)
        elif kind == "strided":
            s = _random(tuple(reversed(shape)), dtype, gen).t()
        else:
            s = _random(shape, dtype, gen)
        dst.append(d.to(device))
        src.append(s.to(device))
    return dst, src


CASES = {
    # StepGraph's inputs at a small step: ids, lengths, h_prompt, h_resp
    "step-inputs": [((6, 8), torch.int64, "plain"), ((6, 8), torch.int32, "plain"),
                    ((6, 40), torch.bfloat16, "plain"), ((6, 8, 40), torch.bfloat16, "plain")],
    # byte counts off the 16-byte units, and segments that end inside a unit
    "odd-bytes": [((7,), torch.uint8, "plain"), ((3,), torch.bfloat16, "plain"),
                  ((1,), torch.bool, "plain"), ((33,), torch.float32, "plain")],
    "misaligned-src": [((5, 13), torch.bfloat16, "offset"), ((17,), torch.int64, "offset"),
                       ((1000,), torch.uint8, "offset")],
    "strided-src": [((4, 9), torch.float32, "strided"), ((300,), torch.int64, "plain"),
                    ((8, 3), torch.bfloat16, "strided")],
    # more pairs than one launch takes (8), and an empty one among them
    "eleven": [((i * 37 + 1,), DTYPES[i % len(DTYPES)], "plain") for i in range(10)]
              + [((0, 4), torch.float32, "plain")],
    # one large pair: many units per thread of the grid
    "large": [((1 << 20,), torch.bfloat16, "plain"), ((4099,), torch.int32, "plain")],
}


@pytest.mark.parametrize("case", list(CASES))
def test_copy_into_equals_copy_per_tensor(device, case):
    gen = torch.Generator().manual_seed(len(case))
    dst, src = _pairs(CASES[case], device, gen)
    want = [d.clone() for d in dst]
    reference.copy_into(want, src)
    torch.ops.care_ext._copy_into(dst, src)
    for k, (a, b) in enumerate(zip(dst, want)):
        assert torch.equal(a, b), k
    # not vacuous: every non-empty src differs from the -1 / False fill it overwrote
    assert all(bool((s != torch.full_like(s, -1 if s.dtype != torch.bool else 0)).any())
               for s in src if s.numel() > 0 and s.dtype != torch.bool)


def test_copy_into_leaves_a_pair_that_is_its_buffer_alone(device):
    """StepGraph passes its own buffer back (StepGraph.buffers): nothing to copy, no error."""
    buf = torch.arange(10, device=device)
    other_dst, other_src = torch.zeros(5, device=device), torch.ones(5, device=device)
    torch.ops.care_ext._copy_into([buf, other_dst], [buf, other_src])
    assert torch.equal(buf, torch.arange(10, device=device))
    assert torch.equal(other_dst, other_src)


def test_ops_copy_into_uses_the_op_and_falls_back(device, monkeypatch):
    dst, src = _pairs(CASES["step-inputs"], device, torch.Generator().manual_seed(5))
    ops.copy_into(dst, src)
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    monkeypatch.setattr(ops, "native_available", lambda dev: False)
    dst2 = [torch.zeros_like(d) for d in dst]
    ops.copy_into(dst2, src)
    assert all(torch.equal(d, s) for d, s in zip(dst2, src))


@pytest.mark.parametrize("impl", ["native", "reference"])
@pytest.mark.parametrize("bad, match", [
    ("count", "src holds 2"),
    ("dtype", "no casting"),
    ("shape", "no broadcasting"),
    ("dst-strided", "must be contiguous"),
])
def test_copy_into_refuses_bad_pairs(device, impl, bad, match):
    d = [torch.zeros(4, 6, device=device), torch.zeros(3, device=device)]
    s = [torch.ones(4, 6, device=device), torch.ones(3, device=device)]
    if bad == "count":
        d.append(torch.zeros(1, device=device))
    elif bad == "dtype":
        s[1] = s[1].double()
    elif bad == "shape":
        s[1] = torch.ones(1, device=device)
    else:
        d[0] = torch.zeros(6, 4, device=device).t()
        s[0] = torch.ones(6, 4, device=device).t()
    call = torch.ops.care_ext._copy_into if impl == "native" else reference.copy_into
    with pytest.raises((RuntimeError, ValueError), match=match):
        call(d, s)


def test_copy_into_refuses_overlapping_pairs(device):
    t = torch.arange(20, dtype=torch.float32, device=device)
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.ops.care_ext._copy_into([t[:10]], [t[5:15]])


@pytest.mark.cuda
def test_copy_into_refuses_tensors_on_two_devices():
    with pytest.raises(RuntimeError, match="must be on"):
        torch.ops.care_ext._copy_into([torch.zeros(3, device="cuda")], [torch.ones(3)])
