"""Every strategy's choice on batches where the right choice is known, under one budget rule."""
import math

import pytest
import torch

from care_ext import reference
from care_ext.config import CareConfig
from care_ext.decision import BOUGHT, CACHED, DROPPED, TRUSTED
from care_ext.labels import CallableOracle, GoldOracle, SimulationOnlyError
from care_ext.step import CareController
from care_ext.strategies import STRATEGIES

from core_synth import make_batch, make_world

B, G, H = 20, 8, 16


def run(strategy, batch, **cfg):
    c = CareController(CareConfig(strategy=strategy, group_size=G, **cfg), GoldOracle(batch.gold))
    kw = batch.kwargs()
    if STRATEGIES[strategy]().needs_logprobs:
        kw["logprobs"] = cfg_logprobs(batch)
    return c, c.decide(batch.uids, batch.ids, **kw)


def cfg_logprobs(batch):
    return -torch.arange(B * G, dtype=torch.float32).view(B, G) / (B * G)


def true_cag(batch):
    gold = torch.tensor([batch.gold[u] for u in batch.uids])
    r_gt = (batch.ids == gold[:, None]).double()
    rank, _ = reference.cluster_stats(batch.ids)
    return reference.cag(r_gt, (rank == 0).double(), 0.0, False)


@pytest.fixture
def batch():
    return make_batch(make_world(B=B, G=G, H=H), 1)


def test_registry_has_every_strategy_and_marks_simulation_only():
    names = {"gt", "ttrl", "ttrl-mask", "oracle-decay", "care", "care-regression", "care-no-pseudo",
             "care-no-stage2", "care-no-aux", "care-no-balance", "care-entropy"}
    names |= {f"{b}{m}" for b in ("random", "entropy", "prob", "oracle") for m in ("", "-mask")}
    assert set(STRATEGIES) == names
    sim = {n for n in names if STRATEGIES[n]().simulation_only}
    assert sim == {"ttrl-mask", "oracle", "oracle-mask", "oracle-decay"}
    for n in sim:
        with pytest.raises(SimulationOnlyError):
            CareController(CareConfig(strategy=n, group_size=G), CallableOracle(lambda u, p: 0))


def test_gt_buys_everything_and_ttrl_nothing(batch):
    _, d = run("gt", batch)
    assert (d.source == BOUGHT).all() and d.labels_bought == B
    gold = torch.tensor([batch.gold[u] for u in batch.uids])
    assert torch.equal(d.rewards, (batch.ids == gold[:, None]).float())
    assert torch.equal(d.gold_ids, gold)
    _, d = run("ttrl", batch)
    assert (d.source == TRUSTED).all() and d.labels_bought == 0
    rank, _ = reference.cluster_stats(batch.ids)
    assert torch.equal(d.rewards, (rank == 0).float()) and (d.weight == 1).all()


def test_ttrl_mask_keeps_exactly_the_correct_majorities(batch):
    _, d = run("ttrl-mask", batch)
    assert torch.equal(d.source == TRUSTED, batch.majority_correct)
    assert torch.equal(d.weight, batch.majority_correct.float())


@pytest.mark.parametrize("mask", [False, True])
def test_oracle_buys_the_top_true_cag_prompts(batch, mask):
    _, d = run("oracle-mask" if mask else "oracle", batch)
    cap = math.ceil(0.2 * B)
    cag = true_cag(batch)
    bought = d.source == BOUGHT
    assert int(bought.sum()) == cap == d.labels_bought
    assert cag[bought].min() >= cag[~bought].max() - 1e-6
    rest = d.source[~bought]
    assert (rest == (DROPPED if mask else TRUSTED)).all()
    assert d.metrics["sim/cag_recall"] == 1.0


def test_oracle_decay_weights_by_exp_minus_lambda_cag(batch):
    _, d = run("oracle-decay", batch, decay_lambda=0.3)
    cag = true_cag(batch).float()
    t = d.source == TRUSTED
    assert int((d.source == BOUGHT).sum()) == math.ceil(0.2 * B)
    torch.testing.assert_close(d.weight[t], torch.exp(-0.3 * cag[t]))


def test_entropy_buys_the_most_split_votes(batch):
    _, d = run("entropy", batch)
    _, sizes = reference.cluster_stats(batch.ids)
    p = sizes.double() / sizes.sum(1, keepdim=True)
    ent = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(1)
    bought = d.source == BOUGHT
    assert ent[bought].min() >= ent[~bought].max() - 1e-9


def test_prob_buys_the_lowest_mean_token_probability(batch):
    _, d = run("prob-mask", batch)
    # logprobs decrease with the row index: the last rows are the least confident
    assert torch.equal((d.source == BOUGHT).nonzero().flatten(), torch.arange(B - 4, B))
    assert (d.source[:B - 4] == DROPPED).all()
    c = CareController(CareConfig(strategy="prob", group_size=G), GoldOracle(batch.gold))
    tok = cfg_logprobs(batch)[..., None].expand(B, G, 5).clone()
    tok[..., 3:] = -50.0  # padding tokens must not count
    mask = torch.zeros(B, G, 5, dtype=torch.bool)
    mask[..., :3] = True
    d2 = c.decide(batch.uids, batch.ids, logprobs=tok, logprob_mask=mask)
    assert torch.equal(d2.source == BOUGHT, d.source == BOUGHT)
    with pytest.raises(ValueError, match="logprobs"):
        CareController(CareConfig(strategy="prob", group_size=G), GoldOracle(batch.gold)).decide(
            batch.uids, batch.ids)


def test_random_is_seeded_and_differs_across_seeds(batch):
    picks = []
    for seed in (0, 0, 1):
        _, d = run("random", batch, seed=seed)
        assert int((d.source == BOUGHT).sum()) == 4
        picks.append(d.source == BOUGHT)
    assert torch.equal(picks[0], picks[1]) and not torch.equal(picks[0], picks[2])


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_budget_caps_hold_for_every_strategy(strategy):
    world = make_world(B=B, G=G, H=H)
    gold = {}
    batches = [make_batch(world, s) for s in range(4)]
    for b in batches:
        gold.update(b.gold)
    p, cap_total = 0.15, 9
    c = CareController(CareConfig(strategy=strategy, group_size=G, budget_frac=p,
                                  global_budget=cap_total, warmup_steps=1), GoldOracle(gold))
    per_step = B if strategy == "gt" else math.ceil(p * B)
    for b in batches:
        kw = b.kwargs()
        if STRATEGIES[strategy]().needs_logprobs:
            kw["logprobs"] = cfg_logprobs(b)
        d = c.decide(b.uids, b.ids, **kw)
        c.update()
        assert d.labels_bought <= per_step
        assert d.metrics["budget/labels_step"] == d.labels_bought
        assert c.store.spent()[0] <= cap_total
        assert set(d.source.tolist()) <= {TRUSTED, BOUGHT, CACHED, DROPPED}
        assert (d.weight[d.source == DROPPED] == 0).all()
        assert torch.isfinite(d.advantages).all()
    if strategy not in ("ttrl", "ttrl-mask"):
        assert c.store.spent()[0] == cap_total  # the global cap is reached, never passed


def test_top_rows_picks_only_eligible_rows_and_never_a_nan_score():
    from care_ext.strategies import top_rows
    nan, inf = math.nan, math.inf
    # an eligible NaN row and an ineligible row: nothing may be picked
    assert top_rows(torch.tensor([nan, 1.0]), torch.tensor([True, False]), 1).tolist() == [False, False]
    # an eligible -inf row ranks last but is still eligible; ineligible rows never come in
    got = top_rows(torch.tensor([0.0, -inf, 2.0]), torch.tensor([False, True, False]), 2)
    assert got.tolist() == [False, True, False]
    # ties to the lower index; k larger than the eligible rows
    assert top_rows(torch.ones(4), torch.tensor([True, True, False, True]), 2).tolist() == \
        [True, True, False, False]
    assert top_rows(torch.tensor([3.0, nan, 1.0, 2.0]), torch.ones(4, dtype=torch.bool), 9).tolist() == \
        [True, False, True, True]


def test_cag_recall_credits_ties_at_the_oracle_cut_in_any_row_order():
    from care_ext.metrics import cag_recall

    nan = float("nan")
    cag = torch.tensor([0.9, 0.0, 0.0, 0.0, 0.0, nan])
    everyone = torch.ones(6, dtype=torch.bool)
    bought = torch.tensor([True, False, False, True, False, False])
    # the Oracle's top 2 is row 0 and any of the four zeros: a bought zero is as good as row 1
    assert cag_recall(cag, everyone, bought) == 1.0
    assert cag_recall(cag, everyone, bought, ties="index") == 0.5  # rows 0 and 1 by index
    for seed in range(5):  # 'credit' does not depend on the row order; 'index' may
        p = torch.randperm(6, generator=torch.Generator().manual_seed(seed))
        assert cag_recall(cag[p], everyone, bought[p]) == 1.0
    # places at the cut are limited: two bought zeros for one remaining place
    assert cag_recall(cag, everyone, torch.tensor([False, True, True, False, False, False])) == 0.5
    # the Oracle's top 3 is rows 0-2: bought rows 0 and 2 count, the NaN row 4 never does, nor
    # row 3 below the cut
    cag2 = torch.tensor([0.9, 0.7, 0.5, 0.2, nan])
    everyone5 = torch.ones(5, dtype=torch.bool)
    assert cag_recall(cag2, everyone5, torch.tensor([True, False, True, False, True])) == 2 / 3
    assert cag_recall(cag2, everyone5, torch.tensor([False, False, False, True, True])) == 0.0
    # fewer eligible rows than purchases: the Oracle buys them all
    few = torch.tensor([True, True, False, False, False])
    assert cag_recall(cag2, few, torch.tensor([True, False, True, False, False])) == 0.5
    assert math.isnan(cag_recall(cag, everyone, torch.zeros(6, dtype=torch.bool)))
    with pytest.raises(ValueError, match="ties"):
        cag_recall(cag, everyone, bought, ties="first")


def test_sim_cag_recall_ties_is_a_config_choice():
    with pytest.raises(ValueError, match="sim_cag_recall_ties"):
        CareConfig(sim_cag_recall_ties="first")
    world = make_world(B=B, G=G, H=H)
    gold = {}
    runs = {"credit": [], "index": []}
    for step in range(6):  # right majorities (true CAG 0) fill the Oracle's cut
        b = make_batch(world, step, p_wrong=0.1)
        gold.update(b.gold)
        for ties, out in runs.items():
            c = CareController(CareConfig(strategy="random", group_size=G,
                                          sim_cag_recall_ties=ties), GoldOracle(gold))
            out.append(c.decide(b.uids, b.ids).metrics["sim/cag_recall"])
    assert all(x >= y for x, y in zip(runs["credit"], runs["index"], strict=True))
    assert runs["credit"] != runs["index"]
