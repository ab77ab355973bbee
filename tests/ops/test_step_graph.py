"""care_ext.step_graph.StepGraph: the acquisition step replayed from a CUDA graph, against plain
calls of care_ext.ops.acquisition_step."""
from __future__ import annotations

import pytest
import torch

from ops_testutil import step_inputs

from care_ext import ops
from care_ext.step_graph import GRAPH_MAX_HIDDEN_BYTES, StepGraph, graph_pays

pytestmark = pytest.mark.native


def _case(B, G, H, seed, device, split):
    from care_ext.bf16_split import first_layer_split

    ids, lengths, h_p, h_r, s1, s2 = step_inputs(B, G, H, torch.bfloat16,
                                                 torch.Generator().manual_seed(seed))
    pieces = first_layer_split(s1, s2, H) if split else None
    d = lambda ts: [t.to(device) for t in ts] if ts is not None else None  # noqa: E731
    return d([ids, lengths, h_p, h_r]), d(s1), d(s2), d(pieces)


def _plain(inputs, s1, s2, pieces):
    return ops.acquisition_step(*inputs, s1, s2, first_layer_split=pieces)


def _assert_same(got, want, what):
    assert len(got) == len(want)
    for name, a, b in zip(got._fields, got, want):
        assert torch.equal(a, b), (what, name)


@pytest.mark.parametrize("split", [False, True], ids=["fp32", "split"])
def test_plan_on_the_cpu_is_a_plain_call(split):
    """Off CUDA a plan captures nothing and returns a plain call's outputs (fresh tensors)."""
    inputs, s1, s2, pieces = _case(5, 8, 32, 0, "cpu", split)
    plan = StepGraph()
    got = plan(*inputs, s1, s2, pieces)
    _assert_same(got, _plain(inputs, s1, s2, pieces), "cpu")
    assert plan.captures == 0 and plan.buffers(*inputs) is None
    assert plan(*inputs, s1, s2, pieces).reliability.data_ptr() != got.reliability.data_ptr()


def test_plan_checks_its_arguments():
    with pytest.raises(ValueError, match="max_graphs must be >= 1, got 0"):
        StepGraph(max_graphs=0)
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        StepGraph(warmup=0)


def test_graph_pays_only_for_small_cuda_states():
    h_p, h_r = torch.zeros(64, 4096, dtype=torch.bfloat16), torch.zeros(64, 8, 4096,
                                                                        dtype=torch.bfloat16)
    assert not graph_pays(h_p, h_r)  # CPU tensors: nothing to replay
    meta = lambda *s: torch.empty(*s, dtype=torch.bfloat16, device="meta")  # noqa: E731
    assert not graph_pays(meta(64, 4096), meta(64, 8, 4096))


@pytest.mark.cuda
def test_graph_pays_by_the_hidden_states_bytes():
    small = (torch.zeros(64, 4096, dtype=torch.bfloat16, device="cuda"),
             torch.zeros(64, 8, 4096, dtype=torch.bfloat16, device="cuda"))
    assert graph_pays(*small)
    rows = GRAPH_MAX_HIDDEN_BYTES // (2 * 4096) + 1  # one row of bf16 states too many
    big = (torch.zeros(1, 4096, dtype=torch.bfloat16, device="cuda"),
           torch.zeros(rows, 1, 4096, dtype=torch.bfloat16, device="cuda"))
    assert not graph_pays(*big)


@pytest.mark.cuda
@pytest.mark.parametrize("split", [False, True], ids=["fp32", "split"])
@pytest.mark.parametrize("B, G", [(64, 8), (9, 64)])
def test_plan_replays_the_step_bit_for_bit(B, G, split):
    """One capture, then every call copies new inputs into the graph's buffers and replays: each
    call's outputs equal a plain call's on the same inputs bit for bit, and they are the plan's
    own tensors (the next call overwrites them in place)."""
    plan = StepGraph()
    _, s1, s2, pieces = _case(B, G, 64, 0, "cuda", split)
    first = None
    for seed in range(1, 5):
        inputs, *_ = _case(B, G, 64, seed, "cuda", split)
        got = plan(*inputs, s1, s2, pieces)
        _assert_same(got, _plain(inputs, s1, s2, pieces), f"call {seed}")
        first = first or got
        assert got.reliability.data_ptr() == first.reliability.data_ptr()
    assert plan.captures == 1


@pytest.mark.cuda
@pytest.mark.parametrize("split", [False, True], ids=["fp32", "split"])
def test_plan_follows_the_weights(split):
    """Weights written in place (version counter) and weights that are new tensors (a classifier
    update's new folded weights) are copied in before the replay: the outputs follow them, with
    no new capture."""
    plan = StepGraph()
    inputs, s1, s2, pieces = _case(64, 8, 64, 0, "cuda", split)
    plan(*inputs, s1, s2, pieces)
    with torch.no_grad():
        s1[6].mul_(1.5)  # head layer 1 of Stage-I, in place
        s2[8].add_(0.25)  # head layer 2 of Stage-II
    _assert_same(plan(*inputs, s1, s2, pieces), _plain(inputs, s1, s2, pieces), "in place")
    _, n1, n2, npieces = _case(64, 8, 64, 3, "cuda", split)
    _assert_same(plan(*inputs, n1, n2, npieces), _plain(inputs, n1, n2, npieces), "new tensors")
    assert plan.captures == 1


@pytest.mark.cuda
def test_plan_captures_per_signature_and_evicts():
    """A new shape captures anew; with max_graphs = 1 the old signature's graph goes, and coming
    back captures it again. Every call stays equal to a plain call."""
    plan = StepGraph(max_graphs=1)
    for k, (B, G) in enumerate([(16, 8), (16, 8), (32, 8), (16, 8)]):
        inputs, s1, s2, pieces = _case(B, G, 64, k, "cuda", True)
        _assert_same(plan(*inputs, s1, s2, pieces), _plain(inputs, s1, s2, pieces), (B, G))
    assert plan.captures == 3


@pytest.mark.cuda
def test_plan_buffers_take_the_inputs_in_place():
    """Inputs written into :meth:`StepGraph.buffers` and passed back are not copied, and the
    outputs are those of a plain call on them; a non-contiguous h_resp is copied into the
    contiguous buffer, so the outputs are the contiguous states' bits."""
    plan = StepGraph()
    inputs, s1, s2, pieces = _case(32, 8, 64, 0, "cuda", True)
    assert plan.buffers(*inputs) is None
    plan(*inputs, s1, s2, pieces)
    bufs = plan.buffers(*inputs)
    assert bufs is not None and all(b.is_contiguous() for b in bufs)
    new, *_ = _case(32, 8, 64, 5, "cuda", True)
    for b, x in zip(bufs, new):
        b.copy_(x)
    _assert_same(plan(*bufs, s1, s2, pieces), _plain(new, s1, s2, pieces), "in place")
    ids, lengths, h_p, h_r = new
    wide = torch.zeros(32, 8, 128, dtype=h_r.dtype, device="cuda")
    wide[..., ::2] = h_r
    _assert_same(plan(ids, lengths, h_p, wide[..., ::2], s1, s2, pieces),
                 _plain(new, s1, s2, pieces), "strided")


@pytest.mark.cuda
def test_plan_rejects_mixed_devices():
    inputs, s1, s2, _ = _case(4, 8, 32, 0, "cuda", False)
    with pytest.raises(ValueError, match="one CUDA device"):
        StepGraph()(*inputs, [w.cpu() for w in s1], s2)
