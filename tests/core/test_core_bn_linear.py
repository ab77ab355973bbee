"""The fused BatchNorm -> Linear training path (care_ext.bn_linear): same outputs, parameter
gradients and running statistics as nn.BatchNorm1d followed by nn.Linear under autograd, for the
column layouts the classifiers use, the < 2-row fallback and momentum=None; the classifiers and a
CARE run with it agree with the autograd path."""
import copy

import pytest
import torch
from torch import nn

import care_ext

from care_ext.bn_linear import (FUSED_MIN_WIDTH, bn_linear, resolve_first_layer_backward,
                                resolve_first_layer_split)
from care_ext.classifiers import _bn, stage1_classifier, stage2_classifier
from care_ext.config import CareConfig
from care_ext.labels import GoldOracle
from care_ext.step import CareController

from core_synth import make_batch, make_world


def _layers(D, O, momentum=0.1, seed=0):
    torch.manual_seed(seed)
    bn, lin = nn.BatchNorm1d(D, momentum=momentum), nn.Linear(D, O)
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.num_batches_tracked.fill_(3)
    return bn.train(), lin


def _grads(mods):
    return [p.grad.clone() for m in mods for p in m.parameters()]


def _ops_called(fn):
    """(fn's result, the set of op packets it dispatched: aten.* and care_ext.*)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Rec(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Rec():
        out = fn()
    return out, seen


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("layout", ["bf16+feat", "f32", "bf16", "f32+feat"])
@pytest.mark.parametrize("n", [37, 2, 1, 0])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_linear_matches_batchnorm_then_linear(layout, n, momentum, split, monkeypatch):
    H, F, O = 48, (3 if "feat" in layout else 0), 10
    g = torch.Generator().manual_seed(n)
    h = (torch.randn(n, H, generator=g) * 2 + 0.5).to(torch.bfloat16 if "bf16" in layout else torch.float32)
    parts = [h] + ([torch.rand(n, F, generator=g)] if F else [])
    bn_a, lin_a = _layers(H + F, O, momentum)
    bn_f, lin_f = copy.deepcopy(bn_a), copy.deepcopy(lin_a)
    w_out = torch.randn(n, O, generator=g)

    ref = lin_a(_bn(bn_a, torch.cat([p.float() for p in parts], dim=1)))
    (ref * w_out).sum().backward()
    import care_ext.bn_linear as bl

    monkeypatch.setattr(bl, "SPLIT_MIN_ROWS_PER_OUTPUT", 0)  # the route on the smallest batches
    out, ops_seen = _ops_called(lambda: bn_linear(bn_f, lin_f, parts, split=split))
    (out * w_out).sum().backward()

    # the split route runs exactly where it applies: a bf16 block and a batch of >= 2 rows
    routed = split and "bf16" in layout and n >= 2 and care_ext.HAS_NATIVE
    assert ("care_ext._bf16_mm" in ops_seen) == routed
    assert ("care_ext._column_stats" in ops_seen) == routed
    assert out.dtype == torch.float32 and out.shape == (n, O)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, a, f in zip(["weight", "bias", "gamma", "beta"], _grads([lin_a, bn_a]), _grads([lin_f, bn_f])):
        torch.testing.assert_close(f, a, rtol=1e-4, atol=1e-5, msg=lambda m, nm=name: f"{nm}: {m}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn_f, name), getattr(bn_a, name), rtol=1e-6, atol=1e-6)
    if n >= 2:  # the statistics moved (the comparison is not between two untouched buffers)
        assert int(bn_f.num_batches_tracked) == 4
        assert not torch.allclose(bn_f.running_mean, _layers(H + F, O, momentum)[0].running_mean)


needs_native = pytest.mark.skipif(not care_ext.HAS_NATIVE, reason="the split route needs the "
                                  "native library (care_ext::_bf16_mm, _column_stats)")


def _error_vs_float64(parts, D, O, split, seed=0):
    """Max |error| / max |value| of bn_linear's output and of its weight and gamma gradients
    against nn.BatchNorm1d -> nn.Linear in float64 on the same (bf16) values."""
    bn, lin = _layers(D, O, seed=seed)
    bn_d, lin_d = copy.deepcopy(bn).double(), copy.deepcopy(lin).double()
    w_out = torch.randn(parts[0].shape[0], O, generator=torch.Generator().manual_seed(seed))
    ref = lin_d(bn_d(torch.cat([p.double() for p in parts], 1)))
    (ref * w_out.double()).sum().backward()
    out = bn_linear(bn, lin, parts, split=split)
    (out * w_out).sum().backward()
    def rel(a, b):
        return float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max())

    return max(rel(out, ref), rel(lin.weight.grad, lin_d.weight.grad),
               rel(bn.weight.grad, bn_d.weight.grad))


@needs_native
def test_bn_linear_split_keeps_large_mean_columns_accurate(monkeypatch):
    """Hidden states with a few "massive activation" channels (mean 2000 standard deviations):
    the split route subtracts the mean after its GEMMs, so those columns would lose ~11 bits;
    it gives them a normalised copy of their own (SPLIT_MAX_MEAN_RATIO) and stays within float32
    rounding of a float64 BatchNorm -> Linear. Without that guard the error is >100x larger."""
    import care_ext.bn_linear as bl

    g = torch.Generator().manual_seed(7)
    n, H, O = 96, 256, 12
    h = torch.randn(n, H, generator=g)
    h[:, [3, 50, 51, 200]] = h[:, [3, 50, 51, 200]] * 0.5 + 1000.0
    parts = [h.bfloat16(), torch.rand(n, 2, generator=g)]
    guarded = _error_vs_float64(parts, H + 2, O, split=True)
    plain = _error_vs_float64(parts, H + 2, O, split=False)
    assert guarded < 2e-6 and guarded <= 4 * plain
    monkeypatch.setattr(bl, "SPLIT_MAX_MEAN_RATIO", float("inf"))
    assert _error_vs_float64(parts, H + 2, O, split=True) > 100 * guarded


@needs_native
def test_bn_linear_split_with_non_finite_weights_falls_back_like_autograd():
    """bf16 pieces cannot carry NaN/Inf: a non-finite weight or output gradient takes the float32
    route, so the output and gradients are non-finite as autograd's (the trainer then skips the
    step) instead of raising from the split."""
    bn, lin = _layers(40, 5)
    with torch.no_grad():
        lin.weight[2, 7] = float("nan")
    bn_a, lin_a = copy.deepcopy(bn), copy.deepcopy(lin)
    x = torch.randn(9, 40).bfloat16()
    out = bn_linear(bn, lin, [x], split=True)
    ref = lin_a(_bn(bn_a, x.float()))
    assert torch.equal(out.isnan(), ref.isnan()) and bool(out[:, 2].isnan().all())
    out.sum().backward()
    ref.sum().backward()
    for a, r in zip(_grads([lin, bn]), _grads([lin_a, bn_a])):  # NaN where autograd has NaN
        assert torch.equal(a.isnan(), r.isnan())
    assert bool(bn.weight.grad[7].isnan()) and bool(bn.weight.grad[:7].isfinite().all())


@needs_native
def test_bn_linear_split_only_on_batches_it_is_faster_for():
    """The split route runs from SPLIT_MIN_ROWS_PER_OUTPUT rows per output unit on (below, its
    three bf16 products per value lose to one float32 GEMM); the same values either way."""
    import care_ext.bn_linear as bl

    bn, lin = _layers(24, 6)
    for n in (bl.SPLIT_MIN_ROWS_PER_OUTPUT * 6 - 1, bl.SPLIT_MIN_ROWS_PER_OUTPUT * 6):
        x = torch.randn(n, 24).bfloat16()
        out, seen = _ops_called(lambda x=x: bn_linear(copy.deepcopy(bn), lin, [x], split=True))
        ref = bn_linear(copy.deepcopy(bn), lin, [x])
        assert ("care_ext._bf16_mm" in seen) == (n >= bl.SPLIT_MIN_ROWS_PER_OUTPUT * 6), n
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bn_linear_single_row_on_a_fresh_cumulative_batchnorm():
    """momentum=None and no batch seen yet: one row normalises with the initial running statistics
    (no division by the zero batch count), as nn.BatchNorm1d in eval mode would."""
    torch.manual_seed(1)
    bn, lin = nn.BatchNorm1d(6, momentum=None).train(), nn.Linear(6, 3)
    x = torch.randn(1, 6)
    out = bn_linear(bn, lin, [x])
    torch.testing.assert_close(out, lin(_bn(copy.deepcopy(bn), x)))
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros(6))


def test_bn_linear_gives_inputs_no_gradient_and_checks_its_arguments():
    bn, lin = _layers(8, 4)
    x = torch.randn(5, 8)
    out = bn_linear(bn, lin, [x])
    out.sum().backward()
    assert x.grad is None and lin.weight.grad is not None and bn.weight.grad is not None
    with pytest.raises(ValueError, match="must not require"):
        bn_linear(bn, lin, [x.clone().requires_grad_()])
    with pytest.raises(ValueError, match="columns wide"):
        bn_linear(bn, lin, [x[:, :6]])
    with pytest.raises(ValueError, match="training path"):
        bn_linear(bn.eval(), lin, [x])


def test_resolve_first_layer_backward():
    assert resolve_first_layer_backward("auto", FUSED_MIN_WIDTH)
    assert not resolve_first_layer_backward("auto", FUSED_MIN_WIDTH - 1)
    assert resolve_first_layer_backward("fused", 8) and not resolve_first_layer_backward("autograd", 8192)
    with pytest.raises(ValueError, match="first_layer_backward"):
        resolve_first_layer_backward("fast", 8)
    with pytest.raises(ValueError, match="first_layer_backward"):
        CareConfig(first_layer_backward="fast")
    cfg = CareConfig(group_size=4)
    lab = stage1_classifier(128, 4, cfg)  # the CPU lab's width keeps autograd's float order
    llm = stage2_classifier(4096, 4, cfg)
    assert (lab.fused_prompt, lab.fused_resp, llm.fused_prompt, llm.fused_resp) == (False, False, True, True)
    from care_ext.bf16_split import cpu_bf16_hardware
    assert resolve_first_layer_backward("split", 8) and resolve_first_layer_split("split", 8)
    assert not resolve_first_layer_split("fused", 8192)
    assert not resolve_first_layer_split("auto", 128)
    assert resolve_first_layer_split("auto", FUSED_MIN_WIDTH) == cpu_bf16_hardware()
    assert (lab.split_resp, llm.split_resp) == (False, cpu_bf16_hardware())
    with pytest.raises(ValueError, match="first_layer_backward"):
        resolve_first_layer_split("fast", 8)


@pytest.mark.parametrize("stage", [1, 2])
def test_classifier_gradients_fused_vs_autograd(stage):
    B, G, H = 12, 8, 40
    world = make_world(B=B, G=G, H=H, seed=1)
    b = make_batch(world, 0)
    from care_ext import ops
    gf = ops.group_features(b.ids, b.lengths)
    mods = []
    for mode in ("autograd", "fused", "split"):
        cfg = CareConfig(group_size=G, first_layer_backward=mode, prompt_dim=16, resp_hidden_dim=8,
                         resp_out_dim=12, head_dim=10)
        torch.manual_seed(0)
        m = (stage1_classifier if stage == 1 else stage2_classifier)(H, G, cfg)
        with torch.no_grad():
            for bn in (m.prompt_bn, m.resp_bn):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_()
        mods.append(m.train())
    assert not mods[0].fused_resp and mods[1].fused_resp and not mods[1].split_resp
    assert mods[2].split_resp and mods[2].split_prompt
    minority = gf.minority_mask.clone()
    minority[0] = False  # a prompt with no pooled rollout
    outs = []
    for m in mods:
        hp, hr = b.h_prompt.bfloat16(), b.h_resp.bfloat16()
        if stage == 1:
            logits, aux = m(hp, gf.prompt_feat, hr, gf.len_norm[..., None])
            loss = logits.logsumexp(1).sum() + aux.pow(2).mean()
        else:
            logits, _ = m(hp, gf.prompt_feat, hr, None, minority)
            loss = logits.logsumexp(1).sum()
        loss.backward()
        outs.append(logits.detach())
    named = dict(mods[0].named_parameters())
    for other, out in zip(mods[1:], outs[1:]):  # fused and split against autograd
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)
        n_checked = 0
        for name, p in other.named_parameters():
            q = named[name]
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, nm=name: f"{nm}: {m}")
                n_checked += 1
        assert n_checked >= 12 and float(other.resp_bn.weight.grad.abs().sum()) > 0
        for name, buf in other.named_buffers():
            torch.testing.assert_close(buf, dict(mods[0].named_buffers())[name], rtol=1e-5, atol=1e-6)


def _care_runs_side_by_side(modes, seed, bf16=False):
    """Two CARE controllers, first_layer_backward = modes[0] and modes[1], over 6 steps of one
    synthetic world (bf16 hidden states if asked): the same decisions every step, reliabilities to
    float32 rounding. Returns (controllers, each one's Stage-I loss per update)."""
    B, G, H = 24, 8, 32
    world = make_world(B=B, G=G, H=H, seed=seed)
    gold = {}
    ctls = [CareController(CareConfig(strategy="care", group_size=G, warmup_steps=2,
                                      first_layer_backward=mode), GoldOracle(gold))
            for mode in modes]
    losses = [[], []]
    for s in range(6):
        b = make_batch(world, s)
        gold.update(b.gold)
        kw = b.kwargs()
        if bf16:
            kw.update(h_prompt=b.h_prompt.bfloat16(), h_resp=b.h_resp.bfloat16())
        ds = [c.decide(b.uids, b.ids, **kw) for c in ctls]
        assert torch.equal(ds[0].source, ds[1].source), f"step {s}"
        torch.testing.assert_close(ds[1].weight, ds[0].weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ds[1].reliability, ds[0].reliability, rtol=1e-4, atol=1e-5)
        for i, c in enumerate(ctls):
            losses[i].append(c.update().get("train/stage1_loss", float("nan")))
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4,
                               atol=1e-5, equal_nan=True)
    assert sum(x == x for x in losses[0]) >= 4  # most steps trained
    return ctls, losses


def test_care_run_with_fused_backward_decides_like_autograd():
    ctls, _ = _care_runs_side_by_side(("autograd", "fused"), seed=5)
    assert ctls[1].trainer.stage1.fused_resp and not ctls[0].trainer.stage1.fused_resp


@needs_native
def test_care_run_with_split_first_layers_decides_like_fused(monkeypatch):
    """A CARE run on bf16 hidden states trained with first_layer_backward='split' (the CPU's
    bf16 GEMMs, no normalised copy) makes the decisions of one trained with 'fused', and its
    classifiers' update losses agree to float32 rounding."""
    import care_ext.bn_linear as bl

    splits = []
    monkeypatch.setattr(bl, "SPLIT_MIN_ROWS_PER_OUTPUT", 0)  # this small run's batches too
    monkeypatch.setattr(bl, "_split", lambda t, f=bl._split: splits.append(t.shape) or f(t))
    ctls, _ = _care_runs_side_by_side(("fused", "split"), seed=6, bf16=True)
    assert ctls[1].trainer.stage1.split_resp and not ctls[0].trainer.stage1.split_resp
    assert len(splits) >= 4 * 2 * 3 * 2  # 4 first layers x (weights, gradient) x 3 steps x 2 updates


@needs_native
@pytest.mark.parametrize("gemm", ["avx2", "mkl"])
def test_bn_linear_fused_on_the_cpu_ops(gemm, monkeypatch):
    """The fused path's float32 blocks (x̂) go through care_ext::_bn_linear_forward / _backward on
    the CPU: on the AVX2 GEMM (forced here; 'auto' picks it at LLM widths on x86 CPUs without
    AVX-512F) to float32 rounding of BatchNorm -> Linear under autograd, on MKL the same bits as
    the twin's ATen calls."""
    if gemm == "avx2" and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the CPU has no AVX2 and FMA")
    monkeypatch.setenv("CARE_EXT_CPU_GEMM", gemm)
    g = torch.Generator().manual_seed(4)
    n, H, F, O = 70, 1100, 5, 24
    parts = [(torch.randn(n, H, generator=g) * 2 + 0.5).bfloat16(), torch.rand(n, F, generator=g)]
    bn_a, lin_a = _layers(H + F, O)
    bn_f, lin_f = copy.deepcopy(bn_a), copy.deepcopy(lin_a)
    w_out = torch.randn(n, O, generator=g)
    ref = lin_a(_bn(bn_a, torch.cat([p.float() for p in parts], dim=1)))
    (ref * w_out).sum().backward()
    out, seen = _ops_called(lambda: bn_linear(bn_f, lin_f, parts))
    (out * w_out).sum().backward()
    assert "care_ext._bn_linear_forward" in seen
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, a, f in zip(["weight", "bias", "gamma", "beta"], _grads([lin_a, bn_a]), _grads([lin_f, bn_f])):
        torch.testing.assert_close(f, a, rtol=1e-4, atol=1e-5, msg=lambda m, nm=name: f"{nm}: {m}")
