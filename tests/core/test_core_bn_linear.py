"""The fused BatchNorm -> Linear training path (care_ext.bn_linear): same outputs, parameter
gradients and running statistics as nn.BatchNorm1d followed by nn.Linear under autograd, for the
column layouts the classifiers use, the < 2-row fallback and momentum=None; the classifiers and a
CARE run with it agree with the autograd path."""
import copy

import pytest
import torch
from torch import nn

from care_ext.bn_linear import FUSED_MIN_WIDTH, bn_linear, resolve_first_layer_backward
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


@pytest.mark.parametrize("layout", ["bf16+feat", "f32", "bf16", "f32+feat"])
@pytest.mark.parametrize("n", [37, 2, 1, 0])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_linear_matches_batchnorm_then_linear(layout, n, momentum):
    H, F, O = 48, (3 if "feat" in layout else 0), 10
    g = torch.Generator().manual_seed(n)
    h = (torch.randn(n, H, generator=g) * 2 + 0.5).to(torch.bfloat16 if "bf16" in layout else torch.float32)
    parts = [h] + ([torch.rand(n, F, generator=g)] if F else [])
    bn_a, lin_a = _layers(H + F, O, momentum)
    bn_f, lin_f = copy.deepcopy(bn_a), copy.deepcopy(lin_a)
    w_out = torch.randn(n, O, generator=g)

    ref = lin_a(_bn(bn_a, torch.cat([p.float() for p in parts], dim=1)))
    (ref * w_out).sum().backward()
    out = bn_linear(bn_f, lin_f, parts)
    (out * w_out).sum().backward()

    assert out.dtype == torch.float32 and out.shape == (n, O)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, a, f in zip(["weight", "bias", "gamma", "beta"], _grads([lin_a, bn_a]), _grads([lin_f, bn_f])):
        torch.testing.assert_close(f, a, rtol=1e-4, atol=1e-5, msg=lambda m, nm=name: f"{nm}: {m}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn_f, name), getattr(bn_a, name), rtol=1e-6, atol=1e-6)
    if n >= 2:  # the statistics moved (the comparison is not between two untouched buffers)
        assert int(bn_f.num_batches_tracked) == 4
        assert not torch.allclose(bn_f.running_mean, _layers(H + F, O, momentum)[0].running_mean)


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


@pytest.mark.parametrize("stage", [1, 2])
def test_classifier_gradients_fused_vs_autograd(stage):
    B, G, H = 12, 8, 40
    world = make_world(B=B, G=G, H=H, seed=1)
    b = make_batch(world, 0)
    from care_ext import ops
    gf = ops.group_features(b.ids, b.lengths)
    mods = []
    for mode in ("autograd", "fused"):
        cfg = CareConfig(group_size=G, first_layer_backward=mode, prompt_dim=16, resp_hidden_dim=8,
                         resp_out_dim=12, head_dim=10)
        torch.manual_seed(0)
        m = (stage1_classifier if stage == 1 else stage2_classifier)(H, G, cfg)
        with torch.no_grad():
            for bn in (m.prompt_bn, m.resp_bn):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_()
        mods.append(m.train())
    assert not mods[0].fused_resp and mods[1].fused_resp
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
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    named = dict(mods[0].named_parameters())
    n_checked = 0
    for name, p in mods[1].named_parameters():
        q = named[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m, nm=name: f"{nm}: {m}")
            n_checked += 1
    assert n_checked >= 12 and float(mods[1].resp_bn.weight.grad.abs().sum()) > 0
    for name, buf in mods[1].named_buffers():
        torch.testing.assert_close(buf, dict(mods[0].named_buffers())[name], rtol=1e-5, atol=1e-6)


def test_care_run_with_fused_backward_decides_like_autograd():
    B, G, H = 24, 8, 32
    world = make_world(B=B, G=G, H=H, seed=5)
    gold = {}
    ctls = [CareController(CareConfig(strategy="care", group_size=G, warmup_steps=2,
                                      first_layer_backward=mode), GoldOracle(gold))
            for mode in ("autograd", "fused")]
    losses = [[], []]
    for s in range(6):
        b = make_batch(world, s)
        gold.update(b.gold)
        ds = [c.decide(b.uids, b.ids, **b.kwargs()) for c in ctls]
        assert torch.equal(ds[0].source, ds[1].source), f"step {s}"
        torch.testing.assert_close(ds[1].weight, ds[0].weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ds[1].reliability, ds[0].reliability, rtol=1e-4, atol=1e-5)
        for i, c in enumerate(ctls):
            m = c.update()
            losses[i].append(m.get("train/stage1_loss", float("nan")))
    assert ctls[1].trainer.stage1.fused_resp and not ctls[0].trainer.stage1.fused_resp
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-5,
                               equal_nan=True)
    assert sum(x == x for x in losses[0]) >= 4  # most steps trained
