"""CARE learns from bought labels only, trusts and buys the right prompts, and its ablations."""
import math

import pytest
import torch

from care_ext import reference
from care_ext.config import CareConfig
from care_ext.decision import BOUGHT, DROPPED, TRUSTED
from care_ext.labels import CallableOracle, GoldOracle
from care_ext.step import CareController

from core_synth import make_batch, make_world

B, G, H = 32, 8, 16


def test_care_learns_to_trust_right_majorities_and_buy_wrong_ones():
    world = make_world(B=B, G=G, H=H)
    gold = {}
    c = CareController(CareConfig(strategy="care", group_size=G, warmup_steps=4), GoldOracle(gold))
    early, late = [], []
    for s in range(18):
        b = make_batch(world, s)
        gold.update(b.gold)
        d = c.decide(b.uids, b.ids, **b.kwargs())
        c.update()
        bought, trusted = d.source == BOUGHT, d.source == TRUSTED
        assert int(bought.sum()) == math.ceil(0.2 * B)
        assert int(trusted.sum()) == (0 if s < 4 else math.ceil(0.25 * B))
        # the trust and buy decisions used no gold: check them against the known truth here
        stats = (float((~b.majority_correct[bought]).float().mean()),
                 float(b.majority_correct[trusted].float().mean()) if trusted.any() else math.nan)
        (early if s < 2 else late).append(stats)
    wrong_early = sum(w for w, _ in early) / len(early)
    wrong_late = sum(w for w, _ in late[-6:]) / 6
    prec_late = sum(p for _, p in late[-6:]) / 6
    assert prec_late >= 0.95  # base rate of right majorities is about 0.6
    assert wrong_late >= 0.85 and wrong_late > wrong_early + 0.3
    assert d.metrics["sim/trust_precision"] >= 0.9


def test_care_reads_no_gold_but_the_bought_labels():
    world = make_world(B=B, G=G, H=H)
    gold, asked = {}, []

    def judge(uid, payload):
        asked.append(uid)
        return gold[uid]

    c = CareController(CareConfig(strategy="care", group_size=G, warmup_steps=1),
                       CallableOracle(judge, backoff_s=0))
    n_bought = 0
    for s in range(4):
        b = make_batch(world, s)
        gold.update(b.gold)
        d = c.decide(b.uids, b.ids, **b.kwargs())
        bought = [u for u, src in zip(b.uids, d.source.tolist()) if src == BOUGHT]
        assert sorted(asked[-len(bought):]) == sorted(bought)
        n_bought += len(bought)
        assert not any(k.startswith("sim/") for k in d.metrics)
        c.update()
    assert len(asked) == n_bought == len(c.trainer.replay1)


def test_trust_weight_rules():
    world = make_world(B=B, G=G, H=H)
    b = make_batch(world, 0)
    for rule in ("reliability", "official"):
        c = CareController(CareConfig(strategy="care", group_size=G, warmup_steps=0, trust_weight=rule,
                                      soft_adv=0.1), GoldOracle(b.gold))
        d = c.decide(b.uids, b.ids, **b.kwargs())
        t = d.source == TRUSTED
        assert t.any()
        if rule == "reliability":  # paper Eq. 7
            torch.testing.assert_close(d.weight[t], d.reliability[t])
        else:
            torch.testing.assert_close(d.weight[t], (0.1 * d.score[t]).clamp(0, 1))
        # the host recipe: GRPO advantage of the rewards, times the weight
        assert torch.allclose(d.advantages[d.source == DROPPED], torch.zeros(1))


@pytest.mark.parametrize("variant", ["regression", "no-pseudo", "no-stage2", "no-aux", "no-balance", "entropy"])
def test_ablations(variant):
    world = make_world(B=B, G=G, H=H)
    gold = {}
    c = CareController(CareConfig(strategy=f"care-{variant}", group_size=G, warmup_steps=1),
                       GoldOracle(gold))
    for s in range(3):
        b = make_batch(world, s)
        gold.update(b.gold)
        d = c.decide(b.uids, b.ids, **b.kwargs())
        m = c.update()
    assert int((d.source == BOUGHT).sum()) == math.ceil(0.2 * B)
    assert "train/stage2_loss" in m and math.isfinite(m["train/stage2_loss"])
    if variant == "no-pseudo":
        assert not (d.source == TRUSTED).any()
    else:
        assert int((d.source == TRUSTED).sum()) == math.ceil(0.25 * B)
    if variant == "regression":
        assert c.trainer.stage2.head.fc2.out_features == 1 and (d.score >= 0).all()
    if variant == "no-stage2":  # buys the least reliable of the untrusted prompts
        rest = d.source != TRUSTED
        bought = d.source == BOUGHT
        assert d.reliability[bought].max() <= d.reliability[rest & ~bought].min()
    if variant == "entropy":  # the trusted set is CARE's; the untrusted with the most split votes are bought
        _, sizes = reference.cluster_stats(b.ids)
        p = sizes.double() / sizes.sum(1, keepdim=True).clamp(min=1)
        ent = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(1)
        rest, bought = d.source != TRUSTED, d.source == BOUGHT
        assert ent[bought].min() >= ent[rest & ~bought].max() - 1e-9
    if variant == "no-aux":
        assert c.trainer.stage1.aux_head is None and m["train/stage1_aux_loss"] == 0.0
    if variant == "no-balance":
        assert c.cfg.class_balance_power == 0.0 and c.config.class_balance_power == 0.5


def test_cached_labels_are_free_and_train_again_next_epoch():
    world = make_world(B=B, G=G, H=H)
    b = make_batch(world, 0)
    c = CareController(CareConfig(strategy="care", group_size=G, warmup_steps=0), GoldOracle(b.gold))
    d1 = c.decide(b.uids, b.ids, **b.kwargs())
    c.update()
    b2 = make_batch(world, 1)  # the same prompts come back with new rollouts
    b2.uids, b2.gold = b.uids, b.gold
    d2 = c.decide(b.uids, b2.ids, **b2.kwargs())
    m = c.update()
    was_bought = d1.source == BOUGHT
    assert (d2.source[was_bought] == 2).all() and (d2.weight[was_bought] == 1).all()
    assert c.store.spent()[0] == d1.labels_bought + d2.labels_bought  # nothing paid twice
    assert not (d2.source[~was_bought] == 2).any()
    assert m["train/samples"] == int(was_bought.sum()) + d2.labels_bought


def test_stage2_can_exclude_correct_majorities():
    world = make_world(B=B, G=G, H=H)
    gold = {}
    c = CareController(CareConfig(strategy="care", group_size=G, warmup_steps=0,
                                  stage2_correct_majority="exclude"), GoldOracle(gold))
    for s in range(3):
        b = make_batch(world, s)
        gold.update(b.gold)
        c.decide(b.uids, b.ids, **b.kwargs())
        c.update()
    r1, r2 = c.trainer.replay1.items, c.trainer.replay2.items
    assert any(x.majority_correct for x in r1)
    assert len(r2) == sum(1 for x in r1 if not x.majority_correct) and not any(x.majority_correct for x in r2)


@pytest.mark.parametrize("rule", ["reliability", "official"])
def test_a_row_with_nonfinite_reliability_is_never_trusted(rule):
    """Finite but overflowing hidden states are accepted as input (test_core_inputs) and make the
    classifiers' outputs NaN for that row. With alpha = 1 every fresh row is gated: the NaN row
    must not be trusted with a NaN weight (which would poison the host's loss)."""
    Bs = 8
    b = make_batch(make_world(B=Bs, G=G, H=H), 0)
    c = CareController(CareConfig(strategy="care", group_size=G, warmup_steps=0, alpha=1.0,
                                  budget_frac=0.0, trust_weight=rule), GoldOracle(b.gold))
    hp = b.h_prompt.clone()
    hp[0] = 3e38
    d = c.decide(b.uids, b.ids, lengths=b.lengths, h_prompt=hp, h_resp=b.h_resp)
    assert math.isnan(float(d.reliability[0]))  # the premise: the classifier overflows on row 0
    assert d.source[0] == DROPPED and float(d.weight[0]) == 0.0
    assert (d.source[1:] == TRUSTED).all()
    assert torch.isfinite(d.weight).all() and torch.isfinite(d.advantages).all()
