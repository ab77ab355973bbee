"""The torch classifiers, their BatchNorm folding into the fused op, and the class-balanced loss."""
import pytest
import torch

from care_ext import ops
from care_ext.classifiers import balanced_ce, class_weights, stage1_classifier, stage2_classifier
from care_ext.config import CareConfig

from core_synth import make_batch, make_world


def _trained_pair(H, G, regression=False):
    """Modules with non-trivial BatchNorm statistics and affine parameters."""
    cfg = CareConfig(group_size=G, hidden_size=H, prompt_dim=16, resp_hidden_dim=8, resp_out_dim=12,
                     head_dim=10)
    torch.manual_seed(0)
    s1, s2 = stage1_classifier(H, G, cfg), stage2_classifier(H, G, cfg, regression)
    for m in (s1, s2):
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm1d):
                mod.weight.data.uniform_(0.5, 1.5)
                mod.bias.data.normal_()
        m.train()
    world = make_world(B=24, G=G, H=H)
    for step in range(3):  # a few train-mode forwards move the running statistics
        b = make_batch(world, step)
        gf = ops.group_features(b.ids, b.lengths)
        with torch.no_grad():
            s1(b.h_prompt * 3 + 1, gf.prompt_feat, b.h_resp * 2 - 1, gf.len_norm[..., None])
            s2(b.h_prompt * 3 + 1, gf.prompt_feat, b.h_resp * 2 - 1, None, gf.minority_mask)
    s1.eval()
    s2.eval()
    return s1, s2, world


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_fused_op_matches_module_eval_forward(dtype):
    H, G = 16, 8
    s1, s2, world = _trained_pair(H, G)
    b = make_batch(world, 7)
    hp, hr = b.h_prompt.to(dtype), b.h_resp.to(dtype)
    out = ops.acquisition_step(b.ids, b.lengths, hp, hr, s1.fold(), s2.fold())
    gf = ops.group_features(b.ids, b.lengths)
    with torch.no_grad():
        l1, aux = s1(hp, gf.prompt_feat, hr, gf.len_norm[..., None])
        l2, _ = s2(hp, gf.prompt_feat, hr, None, gf.minority_mask)
    ref_probs, ref_ecag = ops.expected_cag(l2, gf.cag, gf.admissible)
    torch.testing.assert_close(out.stage1_logits, l1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.reliability, torch.softmax(l1, 1)[:, 1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.probs, ref_probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.ecag, ref_ecag, rtol=1e-4, atol=1e-5)
    assert aux.shape == (b.ids.shape[0], G, 2)
    assert out.ecag.std() > 0 and out.reliability.std() > 0  # a non-degenerate comparison


def test_regression_head_folds_through_classifier_forward():
    H, G = 16, 8
    _, s2, world = _trained_pair(H, G, regression=True)
    b = make_batch(world, 3)
    gf = ops.group_features(b.ids, b.lengths)
    got = ops.classifier_forward(b.h_prompt, gf.prompt_feat, b.h_resp, None, gf.minority_mask, s2.fold())
    with torch.no_grad():
        want, _ = s2(b.h_prompt, gf.prompt_feat, b.h_resp, None, gf.minority_mask)
    assert got.shape == (b.ids.shape[0], 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_class_weights_balance_normalise_and_clip():
    labels = torch.tensor([0] * 16 + [1] * 4 + [3])
    w = class_weights(labels, 5, 0.5, (0.0, 100.0))
    assert w[2] == 0 and w[4] == 0  # absent classes
    present = w[[0, 1, 3]]
    torch.testing.assert_close(present.mean(), torch.tensor(1.0))
    torch.testing.assert_close(w[1] / w[0], torch.tensor(2.0))  # (16 / 4) ** 0.5
    clipped = class_weights(labels, 5, 0.5, (0.25, 1.2))
    assert clipped.max() <= 1.2 and clipped[[0, 1, 3]].min() >= 0.25
    torch.testing.assert_close(class_weights(labels, 5, 0.0, (0.25, 4.0))[[0, 1, 3]], torch.ones(3))


def test_balanced_ce_masks_inadmissible_classes_and_rejects_inadmissible_labels():
    logits = torch.tensor([[0.0, 5.0, 0.0], [1.0, 1.0, 1.0]])
    adm = torch.tensor([[True, False, True], [True, True, True]])
    labels = torch.tensor([0, 1])
    loss = balanced_ce(logits, labels, 0.5, (0.25, 4.0), admissible=adm)
    # row 0: the large inadmissible logit must not matter -> CE over two equal logits = log 2
    w = torch.tensor([1.0, 1.0])
    row1 = torch.nn.functional.cross_entropy(logits[1:], labels[1:])
    torch.testing.assert_close(loss, (w[0] * torch.log(torch.tensor(2.0)) + w[1] * row1) / 2)
    with pytest.raises(ValueError, match="not admissible"):
        balanced_ce(logits, torch.tensor([1, 1]), 0.5, (0.25, 4.0), admissible=adm)


def _samples(n, G, H, seed):
    """n labelled samples with random features (both stages' labels present)."""
    from care_ext.replay import Sample

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        minority = torch.rand(G, generator=g) < 0.5
        minority[0] = True
        adm = torch.ones(G + 1, dtype=torch.bool)
        out.append(Sample(h_prompt=torch.randn(H, generator=g), h_resp=torch.randn(G, H, generator=g),
                          prompt_feat=torch.rand(G + 1, generator=g), len_norm=torch.rand(G, generator=g),
                          minority=minority, admissible=adm, cag=torch.rand(G + 1, generator=g),
                          correct=torch.rand(G, generator=g) < 0.5, majority_correct=i % 2,
                          count=(i % 3) if i % 2 == 0 else 0, true_cag=0.5))
    return out


def test_a_non_finite_batch_skips_its_steps_and_leaves_the_classifiers_finite():
    """A batch with a NaN (decide keeps them out; a replayed or hand-built sample need not) makes a
    NaN loss: its gradient steps are skipped and reported, the BatchNorm statistics its forward had
    moved are put back, the weights stay as they were, and a later clean batch trains as usual."""
    from care_ext.trainer import ClassifierTrainer

    G, H = 4, 8
    cfg = CareConfig(group_size=G, hidden_size=H, prompt_dim=16, resp_hidden_dim=8, resp_out_dim=12,
                     head_dim=10, replay_batch=0)
    tr = ClassifierTrainer(cfg, H)
    tr.train(_samples(6, G, H, 0))
    before = {k: v.clone() for k, v in tr.stage1.state_dict().items()}
    bad = _samples(6, G, H, 1)
    bad[0].h_resp[0, 0] = float("nan")
    m = tr.train(bad)
    assert m["train/nonfinite_skipped"] >= cfg.train_steps  # every Stage-I step saw the sample
    assert "train/stage1_loss" not in m
    for k, v in tr.stage1.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(v, before[k]), k
    for t in list(tr.stage1.parameters()) + list(tr.stage2.parameters()) + list(tr.stage2.buffers()):
        assert torch.isfinite(t).all()
    assert all(torch.isfinite(w).all() for ws in tr.folded() for w in ws)
    m = tr.train(_samples(6, G, H, 2))
    assert "train/nonfinite_skipped" not in m and m["train/stage1_loss"] > 0
    assert not torch.equal(tr.stage1.state_dict()["head.fc2.weight"], before["head.fc2.weight"])


@pytest.mark.parametrize("backward", ["autograd", "fused"])
def test_no_mask_trains_exactly_like_an_all_true_mask(backward):
    # without a mask the rollout branch takes every row as a view (no gather, no scatter back):
    # the same logits, aux logits, gradients and BatchNorm statistics, bit for bit
    G, H = 6, 20
    cfg = CareConfig(group_size=G, hidden_size=H, prompt_dim=16, resp_hidden_dim=8,
                     resp_out_dim=12, head_dim=10, aux_weight=0.5, first_layer_backward=backward)
    b = make_batch(make_world(B=10, G=G, H=H), 0)
    gf = ops.group_features(b.ids, b.lengths)
    runs = []
    for mask in (None, torch.ones(10, G, dtype=torch.bool)):
        torch.manual_seed(0)
        m = stage1_classifier(H, G, cfg).train()
        logits, aux = m(b.h_prompt, gf.prompt_feat, b.h_resp.bfloat16(), gf.len_norm[..., None], mask)
        (logits.square().sum() + aux.sin().sum()).backward()
        runs.append((logits, aux, {k: p.grad for k, p in m.named_parameters()},
                     {k: v.clone() for k, v in m.named_buffers()}))
    (l0, a0, g0, s0), (l1, a1, g1, s1) = runs
    assert torch.equal(l0, l1) and torch.equal(a0, a1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


def test_stage_batches_equal_stacking_current_and_replay_every_step():
    import dataclasses

    from care_ext.replay import stack
    from care_ext.trainer import _StageBatches

    cur, hist = _samples(5, 4, 6, seed=1), _samples(9, 4, 6, seed=2)
    cur16 = [dataclasses.replace(s, h_resp=s.h_resp.bfloat16()) for s in cur]
    # replay sets of several sizes, an empty one, then one larger than the buffers, and float32
    # replay after bfloat16 current samples (stack promotes; a bf16 buffer would round): the last
    # two are stacked as before
    mixed = cur16[:2] + cur[2:]  # bf16 and float32 states in one update: stacked as float32
    for current, reps in ((cur, (hist[:4], hist[4:6], [], hist[2:3], hist[:7], hist[5:9])),
                          (cur16, (hist[:3], [])), (mixed, (hist[:2], cur16[:1]))):
        sb = _StageBatches(current, 4, "cpu")
        for rep in reps:
            got, want = sb.batch(rep), stack(current + rep)
            assert got.keys() == want.keys()
            for k in want:
                assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (len(rep), k)


@pytest.mark.parametrize("dtypes", [("bfloat16",), ("bfloat16", "float16"),
                                    ("float16", "bfloat16", "bfloat16", "float32"),
                                    ("float32", "float64", "bfloat16")])
def test_stacked_layout_gives_the_dtype_stack_gives(dtypes):
    """stacked_layout promotes over the distinct dtypes of a field (one promote_types call per
    distinct dtype, not per sample: ~900 dispatched calls per CUDA update before): the dtype and
    shape torch.stack gives, whatever the order of the samples."""
    import dataclasses

    from care_ext.replay import stack, stacked_layout

    base = _samples(len(dtypes) * 2, 4, 6, seed=4)
    for order in (1, -1):
        samples = [dataclasses.replace(s, h_resp=s.h_resp.to(getattr(torch, d)))
                   for s, d in zip(base, (dtypes * 2)[::order])]
        layout, batch = stacked_layout(samples), stack(samples)
        assert layout.keys() == batch.keys()
        for k, (dtype, shape) in layout.items():
            assert batch[k].dtype == dtype and tuple(batch[k].shape[1:]) == shape, (dtypes, k)


def test_a_batch_that_cannot_be_stacked_leaves_the_classifiers_in_eval_mode():
    import dataclasses

    from care_ext.trainer import ClassifierTrainer

    G, H = 4, 6
    t = ClassifierTrainer(CareConfig(group_size=G, hidden_size=H, prompt_dim=8, resp_hidden_dim=4,
                                     resp_out_dim=6, head_dim=5), H)
    good = _samples(3, G, H, seed=3)
    bad = dataclasses.replace(good[0], h_resp=torch.randn(G + 1, H))  # another group size
    with pytest.raises(RuntimeError):
        t.train(good + [bad])
    assert not t.stage1.training and not t.stage2.training
