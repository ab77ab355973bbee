"""Hidden states projected by the host (care_ext.projection): a run that ships only the first-layer
projections decides like the run that ships raw hidden states, trains on the same raw rows (fetched
for the trained prompts only), and refuses projections made with another step's weights."""
import pytest
import torch

from care_ext import ops
from care_ext.config import CareConfig
from care_ext.decision import BOUGHT, CACHED
from care_ext.labels import DelayedGoldOracle, GoldOracle
from care_ext.projection import ProjectedHidden, pad_columns, padded_width, reduced_weights
from care_ext.step import CareController

from core_synth import make_batch, make_world

B, G, H = 32, 8, 24


def _pair(strategy, oracle_kind, **cfg):
    gold = {}
    mk = (lambda: GoldOracle(gold)) if oracle_kind == "gold" else (lambda: DelayedGoldOracle(gold, delay_steps=1))
    conf = CareConfig(strategy=strategy, group_size=G, warmup_steps=2, **cfg)
    return gold, CareController(conf, mk()), CareController(conf, mk())


def _projected(ctl, b, fetched):
    proj = ctl.first_layer_projection()
    if proj is None:
        return None
    pp, pr = proj.apply(b.h_prompt, b.h_resp)

    def fetch(rows):
        fetched.append(list(rows))
        return b.h_prompt[rows], b.h_resp[rows]

    return ProjectedHidden(pp, pr, proj.version, fetch)


@pytest.mark.parametrize("strategy,oracle_kind,extra", [
    ("care", "gold", {}),
    ("care", "delayed", {}),
    ("care-regression", "gold", {}),
    ("care", "gold", {"train_on_cached": False}),
])
def test_projected_run_decides_and_trains_like_the_raw_run(strategy, oracle_kind, extra):
    world = make_world(B=B, G=G, H=H, seed=3)
    gold, raw, red = _pair(strategy, oracle_kind, **extra)
    n_projected = 0
    for s in range(7):
        # repeat earlier prompts from step 3 on: cached labels (trained on unless train_on_cached=False)
        b = make_batch(world, s if s < 3 else s - 3, prefix="s")
        gold.update(b.gold)
        fetched = []
        ph = _projected(red, b, fetched)
        d_raw = raw.decide(b.uids, b.ids, **b.kwargs())
        if ph is None:  # step 0: the classifiers do not exist yet, the host ships raw states
            assert s == 0
            d_red = red.decide(b.uids, b.ids, **b.kwargs())
        else:
            n_projected += 1
            d_red = red.decide(b.uids, b.ids, lengths=b.lengths, projected=ph)
        assert torch.equal(d_raw.source, d_red.source), f"step {s}"
        assert torch.equal(d_raw.rewards, d_red.rewards)
        # trust weights are continuous (soft_adv x expected CAG): equal to float32 rounding
        torch.testing.assert_close(d_red.weight, d_raw.weight, rtol=1e-5, atol=1e-6)
        assert torch.equal(d_raw.weight == 0, d_red.weight == 0)
        torch.testing.assert_close(d_red.score, d_raw.score, rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(d_red.reliability, d_raw.reliability, rtol=1e-5, atol=1e-6)
        if ph is not None:
            trained = (d_red.source == BOUGHT) | ((d_red.source == CACHED) if red.cfg.train_on_cached else False)
            want = set(trained.nonzero().flatten().tolist())
            pending = d_red.metrics["budget/pending"]
            if want or pending:
                assert len(fetched) == 1  # one round trip per step
                assert want <= set(fetched[0]) and len(fetched[0]) == len(want) + pending
            else:
                assert fetched == []
        raw.update()
        red.update()
    assert n_projected == 6
    s_raw, s_red = raw.trainer.state_dict(), red.trainer.state_dict()
    for name in ("stage1", "stage2"):
        for k, v in s_raw[name].items():
            torch.testing.assert_close(s_red[name][k], v, rtol=0, atol=0, msg=f"{name}.{k}")


def test_projection_is_refused_when_stale_or_mixed():
    world = make_world(B=B, G=G, H=H)
    gold, c, _ = _pair("care", "gold")
    b0 = make_batch(world, 0)
    gold.update(b0.gold)
    assert c.first_layer_projection() is None  # no classifiers before the first raw step
    c.decide(b0.uids, b0.ids, **b0.kwargs())
    with pytest.raises(RuntimeError, match="between decide"):
        c.first_layer_projection()
    c.update()
    b1 = make_batch(world, 1)
    gold.update(b1.gold)
    ph = _projected(c, b1, [])
    with pytest.raises(ValueError, match="not both"):
        c.decide(b1.uids, b1.ids, lengths=b1.lengths, h_prompt=b1.h_prompt, h_resp=b1.h_resp, projected=ph)
    bad_shape = ProjectedHidden(ph.prompt[:, :-1], ph.resp, ph.version, ph.fetch_raw)
    with pytest.raises(ValueError, match=r"projected.prompt must be \[B, P1\+P2\]"):
        c.decide(b1.uids, b1.ids, lengths=b1.lengths, projected=bad_shape)
    wrong_fetch = ProjectedHidden(ph.prompt, ph.resp, ph.version, lambda rows: (b1.h_prompt, b1.h_resp))
    with pytest.raises(ValueError, match="fetch_raw returned"):
        c.decide(b1.uids, b1.ids, lengths=b1.lengths, projected=wrong_fetch)
    c2_gold, c2, _ = _pair("care", "gold")
    c2_gold.update(gold)
    c2.decide(b0.uids, b0.ids, **b0.kwargs())
    c2.update()
    ph2 = _projected(c2, b1, [])
    c2.decide(b1.uids, b1.ids, lengths=b1.lengths, projected=ph2)
    c2.update()
    b2 = make_batch(world, 2)
    c2_gold.update(b2.gold)
    with pytest.raises(ValueError, match="weights of step 1, the controller is at step 2"):
        c2.decide(b2.uids, b2.ids, lengths=b2.lengths, projected=ph2)  # last step's projection
    forged = ProjectedHidden(ph2.prompt, ph2.resp, 2, ph2.fetch_raw)  # labelled step 2 by hand
    with pytest.raises(ValueError, match="projection was never taken"):
        c2.decide(b2.uids, b2.ids, lengths=b2.lengths, projected=forged)
    ttrl_gold, ttrl, _ = _pair("ttrl", "gold")
    assert ttrl.first_layer_projection() is None
    with pytest.raises(ValueError, match="uses no hidden states"):
        ttrl.decide(b0.uids, b0.ids, lengths=b0.lengths, projected=ph2)


def test_nonfinite_projection_rows_are_dropped_like_raw_ones():
    world = make_world(B=B, G=G, H=H)
    gold, raw, red = _pair("care", "gold", nonfinite="drop")
    for s in range(2):
        b = make_batch(world, s)
        gold.update(b.gold)
        if s == 1:
            b.h_resp[5, 2, 3] = float("nan")
        ph = _projected(red, b, [])
        d_raw = raw.decide(b.uids, b.ids, **b.kwargs())
        d_red = red.decide(b.uids, b.ids, **b.kwargs()) if ph is None else \
            red.decide(b.uids, b.ids, lengths=b.lengths, projected=ph)
        assert torch.equal(d_raw.source, d_red.source)
        raw.update()
        red.update()
    assert int(d_red.source[5]) == int(d_raw.source[5]) and d_red.weight[5] == 0


@pytest.mark.parametrize("which", [0, 1])
def test_reduced_weights_on_projections_equal_the_full_forward(which):
    """ops.classifier_forward (native when built) with the reduced weights on the projected inputs
    equals the full forward on the raw inputs."""
    world = make_world(B=B, G=G, H=H)
    gold, c, _ = _pair("care", "gold")
    b = make_batch(world, 0)
    gold.update(b.gold)
    c.decide(b.uids, b.ids, **b.kwargs())
    c.update()
    proj = c.first_layer_projection()
    w = c.trainer.folded()[which]
    gf = ops.group_features(b.ids, b.lengths, c.cfg.max_len, c.cfg.cag_eps, c.cfg.cag_unbiased,
                            c.cfg.adv_eps, c.cfg.adv_unbiased)
    rf = gf.len_norm[..., None] if which == 0 else None
    mask = None if which == 0 else gf.minority_mask
    full = ops.classifier_forward(b.h_prompt, gf.prompt_feat, b.h_resp, rf, mask, w)
    pp, pr = proj.apply(b.h_prompt, b.h_resp)
    W = padded_width(proj.prompt_split, proj.resp_split)
    red = ops.classifier_forward(pad_columns(pp, W), gf.prompt_feat, pad_columns(pr, W), rf, mask,
                                 reduced_weights(w, H, which, proj.prompt_split, proj.resp_split))
    torch.testing.assert_close(red, full, rtol=1e-5, atol=1e-5)
    assert pp.shape == (B, sum(proj.prompt_split)) and pr.shape == (B, G, sum(proj.resp_split))
