"""CARE learns from bought labels only, trusts and buys the right prompts, and its ablations."""
import math

import pytest
import torch

from care_ext import ops as c_ops
from care_ext import reference
from care_ext.config import CareConfig
from care_ext.decision import BOUGHT, DROPPED, TRUSTED
from care_ext.labels import CallableOracle, GoldOracle, QueueOracle
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


def _expected_sample(b, gf, i, gold):
    """Row i's sample by the definitions (care_ext.replay.Sample), one row at a time."""
    correct = (b.ids[i] == gold) & (gold >= 0)
    maj = bool((correct & (gf.rank[i] == 0)).any())
    count = 0 if maj else int((correct & (gf.rank[i] > 0)).sum())
    return dict(ids=b.ids[i], rank=gf.rank[i], h_prompt=b.h_prompt[i], h_resp=b.h_resp[i],
                prompt_feat=gf.prompt_feat[i], len_norm=gf.len_norm[i],
                minority=gf.minority_mask[i], admissible=gf.admissible[i], cag=gf.cag[i],
                correct=correct, majority_correct=int(maj), count=count,
                true_cag=0.0 if maj else float(gf.cag[i][count]))


def _assert_sample(s, want, inputs):
    for k, v in want.items():
        if k in ("ids", "rank"):
            continue  # the sample keeps ids only through its labels; rank is not a Sample field
        got = getattr(s, k)
        if isinstance(v, torch.Tensor):
            assert got.dtype == v.dtype and torch.equal(got, v), k
        else:
            assert type(got) is type(v) and got == v, k
    for t in (s.h_prompt, s.h_resp):  # its own copy: neither the step's inputs nor their views
        assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
                   for x in inputs)


def test_samples_hold_their_rows_features_and_the_labels_their_gold_defines():
    world = make_world(B=B, G=G, H=H)
    gold = {}
    c = CareController(CareConfig(strategy="care", group_size=G, warmup_steps=1), GoldOracle(gold))
    seen = []
    for s in range(3):
        b = make_batch(world, s, p_wrong=0.6)
        gold.update(b.gold)
        d = c.decide(b.uids, b.ids, **b.kwargs())
        gf = c_ops.group_features(b.ids, b.lengths)
        rows = (d.source == BOUGHT).nonzero().flatten().tolist()
        samples = list(c._samples)  # this step's, in row order
        assert len(samples) == len(rows) > 0
        for s_, i in zip(samples, rows, strict=True):
            _assert_sample(s_, _expected_sample(b, gf, i, torch.tensor(b.gold[b.uids[i]])),
                           [b.h_prompt, b.h_resp])
            seen.append((s_.majority_correct, s_.count))
        c.update()
    # both label kinds and a count above 0 occurred, so every branch of the labels was checked
    assert {m for m, _ in seen} == {0, 1} and max(n for _, n in seen) > 0


def test_a_late_label_makes_the_sample_of_the_step_that_asked():
    world = make_world(B=B, G=G, H=H)
    q = QueueOracle()
    c = CareController(CareConfig(strategy="care", group_size=G, warmup_steps=0), q)
    b0 = make_batch(world, 0, p_wrong=0.6)
    c.decide(b0.uids, b0.ids, **b0.kwargs())
    c.update()
    asked = [u for u, _ in q.take_requests()]
    for u in asked:
        q.deliver(u, b0.gold[u])
    b1 = make_batch(world, 1, prefix="t")
    c.decide(b1.uids, b1.ids, **b1.kwargs())
    gf = c_ops.group_features(b0.ids, b0.lengths)
    arrived = c._samples[:len(asked)]  # polled before this step's purchases
    for s_, u in zip(arrived, asked, strict=True):
        i = b0.uids.index(u)
        _assert_sample(s_, _expected_sample(b0, gf, i, torch.tensor(b0.gold[u])),
                       [b0.h_prompt, b0.h_resp, b1.h_prompt, b1.h_resp])
