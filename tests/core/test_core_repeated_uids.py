"""One prompt uid in several rows of a batch (CareConfig.repeated_uids='share', the default):
each row is decided on its own rollouts, the uid is bought once, and its label serves every row.
"""
import math

import pytest
import torch

from care_ext.config import CareConfig
from care_ext.decision import BOUGHT, CACHED, DROPPED
from care_ext.labels import GoldOracle, LabelStore, QueueOracle
from care_ext.step import CareController
from care_ext.uid_groups import UidGroups

from core_synth import make_batch, make_world

B, G, H = 16, 8, 16


class CountingGold(GoldOracle):
    """GoldOracle that records every (uid, payload) it is asked for."""

    def __init__(self, gold):
        super().__init__(gold)
        self.asked = []

    def request_many(self, items):
        self.asked.extend(items)
        return super().request_many(items)


def repeated_batch(step=0, copies=((2, 7), (2, 9), (4, 11))):
    """A synthetic batch whose row ``j`` of each (i, j) in ``copies`` is another rollout group of
    row i's prompt: same uid and gold, the rollouts of row i permuted."""
    b = make_batch(make_world(B=B, G=G, H=H), step)
    b.ids = b.ids.clone()
    g = torch.Generator().manual_seed(step)
    for i, j in copies:
        b.uids[j] = b.uids[i]
        b.ids[j] = b.ids[i][torch.randperm(G, generator=g)]
    return b


def test_uid_groups_spread_and_first_in_order():
    gr = UidGroups(["a", "b", "a", "c", "b", "a"])
    assert gr.repeated and gr.n_unique == 3 and gr.rep.tolist() == [0, 1, 0, 3, 1, 0]
    rows = torch.zeros(6, dtype=torch.bool)
    rows[4] = True
    assert gr.spread(rows).tolist() == [False, True, False, False, True, False]
    assert gr.spread_rows([5]) == [0, 2, 5] and gr.spread_rows([]) == []
    assert gr.first_in_order(torch.tensor([5, 2, 4, 3, 0, 1])).tolist() == [5, 4, 3]
    plain = UidGroups(["x", "y"])
    assert not plain.repeated and plain.spread_rows([1]) == [1]
    assert plain.first_in_order(torch.tensor([1, 0])).tolist() == [1, 0]


def test_error_mode_names_the_repeats():
    b = repeated_batch()
    c = CareController(CareConfig(strategy="ttrl", group_size=G, repeated_uids="error"),
                       GoldOracle(b.gold))
    with pytest.raises(ValueError, match=rf"duplicate prompt uids.*{b.uids[2]}.*'share'"):
        c.decide(b.uids, b.ids)


def test_buy_all_asks_each_uid_once_and_labels_every_row():
    b = repeated_batch()
    U = len(set(b.uids))
    oracle = CountingGold(b.gold)
    c = CareController(CareConfig(strategy="gt", group_size=G), oracle)
    payloads = [f"row{i}" for i in range(B)]
    d = c.decide(b.uids, b.ids, payloads=payloads)
    asked = [u for u, _ in oracle.asked]
    assert sorted(asked) == sorted(set(b.uids)) and len(asked) == U == 13
    assert dict(oracle.asked)[b.uids[2]] == "row2"  # the first row of the uid asks
    assert (d.source == BOUGHT).all() and d.labels_bought == B
    assert c.store.spent() == (U, float(U)) and d.metrics["budget/labels_step"] == U
    gold = torch.tensor([b.gold[u] for u in b.uids])
    assert torch.equal(d.gold_ids, gold)
    assert torch.equal(d.rewards, (b.ids == gold[:, None]).float())  # each row on its rollouts


def test_the_step_cap_counts_distinct_uids_and_a_uid_is_charged_once():
    b = repeated_batch()
    U = len(set(b.uids))
    for seed in range(6):
        oracle = CountingGold(b.gold)
        c = CareController(CareConfig(strategy="random", group_size=G, seed=seed), oracle)
        d = c.decide(b.uids, b.ids)
        asked = [u for u, _ in oracle.asked]
        assert len(asked) == len(set(asked)) == math.ceil(0.2 * U) == 3  # ceil(0.2 * 16) = 4
        assert c.store.spent()[0] == 3
        bought_uids = {b.uids[i] for i in (d.source == BOUGHT).nonzero().flatten().tolist()}
        assert bought_uids == set(asked)
        for i in range(B):  # every row of a bought uid is bought
            assert (d.source[i] == BOUGHT) == (b.uids[i] in bought_uids)


def test_a_uid_ranks_by_its_best_row():
    """entropy-mask buys the highest-entropy prompt: row 7's rollouts (all different answers)
    put its uid first, though the uid's first row (2, one answer) has the lowest entropy."""
    b = repeated_batch(copies=((2, 7),))
    b.ids[2] = b.gold[b.uids[2]]
    b.ids[7] = torch.arange(100, 100 + G)
    b.ids[7, 0] = b.gold[b.uids[2]]
    oracle = CountingGold(b.gold)
    c = CareController(CareConfig(strategy="entropy-mask", group_size=G, budget_frac=0.05),
                       oracle)
    d = c.decide(b.uids, b.ids)
    assert [u for u, _ in oracle.asked] == [b.uids[2]]
    assert (d.source == BOUGHT).nonzero().flatten().tolist() == [2, 7]
    assert d.rewards[7].tolist() == [1.0] + [0.0] * (G - 1) and d.rewards[2].eq(1).all()


def test_repeats_are_cached_at_a_later_step_and_a_bad_row_stays_dropped():
    b = repeated_batch()
    c = CareController(CareConfig(strategy="gt", group_size=G, nonfinite="drop"),
                       GoldOracle(b.gold))
    c.decide(b.uids[:8], b.ids[:8])  # step 0 buys uids of rows 0..7 (row 7 repeats row 2's)
    c.update()
    lengths = torch.full((B, G), 100.0)
    lengths[9, 0] = float("nan")  # row 9 repeats row 2's uid; its features are bad
    oracle_n = c.store.spent()[0]
    d = c.decide(b.uids, b.ids, lengths=lengths)
    assert d.source[2] == CACHED and d.source[7] == CACHED and d.source[9] == DROPPED
    assert d.source[11] == CACHED and d.source[4] == CACHED  # row 11's uid is row 4's
    assert c.store.spent()[0] == oracle_n + len(set(b.uids[8:]) - set(b.uids[:8]))
    assert d.labels_bought == int((d.source == BOUGHT).sum())


def test_an_async_request_is_made_once_and_every_row_waits_then_is_cached():
    b = repeated_batch(copies=((2, 7),))
    q = QueueOracle()
    c = CareController(CareConfig(strategy="gt", group_size=G), q)
    d0 = c.decide(b.uids, b.ids)
    asked = [u for u, _ in q.take_requests()]
    assert len(asked) == len(set(asked)) == B - 1 and (d0.source == DROPPED).all()
    assert d0.metrics["budget/pending"] == B - 1
    c.update()
    d1 = c.decide(b.uids, b.ids)
    assert d1.metrics["budget/waiting"] == B and c.store.spent()[0] == B - 1
    c.update()
    q.deliver(b.uids[2], b.gold[b.uids[2]])
    d2 = c.decide(b.uids, b.ids)
    assert d2.source[2] == CACHED and d2.source[7] == CACHED
    assert (d2.source[[i for i in range(B) if i not in (2, 7)]] == DROPPED).all()


def test_the_audit_slice_draws_uids_and_labels_their_rows():
    b = repeated_batch()
    U = len(set(b.uids))
    for seed in range(30):  # 4 draws of 16 rows hold two rows of one uid ~18% of the time
        oracle = CountingGold(b.gold)
        c = CareController(CareConfig(strategy="ttrl", group_size=G, audit_frac=1.0,
                                      budget_frac=0.25, seed=seed), oracle)
        d = c.decide(b.uids, b.ids)
        asked = [u for u, _ in oracle.asked]
        assert len(asked) == len(set(asked)) == math.ceil(0.25 * U) == d.metrics["audit/n_step"]
        rows = [i for i in range(B) if b.uids[i] in asked]
        assert (d.source == BOUGHT).nonzero().flatten().tolist() == rows


def test_a_repeat_with_bad_features_is_dropped_while_its_uid_is_bought():
    b = repeated_batch()
    lengths = torch.full((B, G), 100.0)
    lengths[9, 0] = float("nan")  # row 9 repeats row 2's uid
    c = CareController(CareConfig(strategy="gt", group_size=G, nonfinite="drop"),
                       GoldOracle(b.gold))
    d = c.decide(b.uids, b.ids, lengths=lengths)
    assert d.source[2] == BOUGHT and d.source[7] == BOUGHT and d.source[9] == DROPPED
    assert d.labels_bought == B - 1 and d.weight[9] == 0


def _seed_buying(b, oracle, row):
    """A Random seed whose step 0 buys the uid of ``row``, with its controller and decision."""
    for seed in range(50):
        cfg = CareConfig(strategy="random", group_size=G, seed=seed)
        c = CareController(cfg, oracle(), LabelStore(":memory:"))
        d = c.decide(b.uids, b.ids)
        if b.uids[row] in c.store.ledger([b.uids[row]]):
            return cfg, c, d
    raise AssertionError("no seed buys that row")


def test_a_rerun_of_the_step_labels_every_row_of_a_uid_it_bought():
    """A crash after the labels were stored, the step rerun by the same run: the rerun selects
    the same rows and takes the stored labels as this step's purchases, on every repeat."""
    b = repeated_batch()
    cfg, a, d = _seed_buying(b, lambda: GoldOracle(b.gold), 2)
    assert d.source[2] == d.source[7] == d.source[9] == BOUGHT
    r = CareController(cfg, GoldOracle(b.gold), a.store)
    r.run_id = a.run_id
    d2 = r.decide(b.uids, b.ids)
    assert torch.equal(d2.source, d.source) and a.store.spent() == (3, 3.0)


def test_a_lost_async_request_is_asked_again_once_and_every_repeat_waits():
    b = repeated_batch()
    cfg, a, d = _seed_buying(b, QueueOracle, 2)
    assert d.source[[2, 7, 9]].eq(DROPPED).all()
    # a crash: the old queue is gone. TTRL buys nothing itself: only the retry asks
    r = CareController(CareConfig(strategy="ttrl", group_size=G), QueueOracle(), a.store)
    r.step = 1
    d1 = r.decide(b.uids, b.ids)
    asked = [u for u, _ in r.oracle.take_requests()]
    assert asked.count(b.uids[2]) == 1  # a free retry: its ledger row is pending
    assert d1.source[[2, 7, 9]].eq(DROPPED).all() and d1.metrics["budget/pending"] == 3
    assert a.store.spent() == (3, 3.0)


def test_a_sync_charge_lost_in_a_crash_is_retried_once_for_every_repeat():
    """A crash between 'requested' and 'stored': the next step asks the uid again for free, and
    the label serves all its rows."""
    b = repeated_batch()
    store = LabelStore(":memory:")
    assert store.reserve([b.uids[2]], 0, 1.0, "sync", 2, None) == [b.uids[2]]  # then a crash
    oracle = CountingGold(b.gold)
    c = CareController(CareConfig(strategy="ttrl", group_size=G), oracle, store)
    c.step = 1
    d = c.decide(b.uids, b.ids)
    assert [u for u, _ in oracle.asked] == [b.uids[2]]
    assert (d.source == BOUGHT).nonzero().flatten().tolist() == [2, 7, 9]
    assert d.labels_bought == 3 and store.spent() == (1, 1.0)


def test_a_uid_whose_first_row_is_bad_is_audited_through_another():
    b = repeated_batch()
    lengths = torch.full((B, G), 100.0)
    lengths[2, 0] = float("nan")  # rows 7 and 9 repeat row 2's uid
    hits = 0
    for seed in range(30):
        oracle = CountingGold(b.gold)
        c = CareController(CareConfig(strategy="ttrl", group_size=G, audit_frac=1.0,
                                      budget_frac=0.25, seed=seed, nonfinite="drop"), oracle)
        d = c.decide(b.uids, b.ids, lengths=lengths)
        asked = dict(oracle.asked)
        assert len(oracle.asked) == len(asked) == 4
        if b.uids[2] in asked:
            hits += 1
            assert d.source[2] == DROPPED and d.source[7] == d.source[9] == BOUGHT
    assert hits > 0


def test_an_audited_uid_is_not_bought_again_by_the_strategy():
    b = repeated_batch()
    U = len(set(b.uids))
    for seed in range(30):
        oracle = CountingGold(b.gold)
        c = CareController(CareConfig(strategy="random", group_size=G, audit_frac=0.5,
                                      budget_frac=0.25, seed=seed), oracle)
        d = c.decide(b.uids, b.ids)
        asked = [u for u, _ in oracle.asked]
        assert len(asked) == len(set(asked)) == math.ceil(0.25 * U)
        assert d.metrics["audit/n_step"] == 2


def test_care_decides_and_trains_on_repeated_rows():
    gold = {}
    c = CareController(CareConfig(strategy="care", group_size=G, warmup_steps=0), GoldOracle(gold))
    for step in range(3):
        b = repeated_batch(step)
        b.h_resp[7] = b.h_resp[2]  # same prompt: the same prompt state, other rollouts
        b.h_prompt[7] = b.h_prompt[2]
        gold.update(b.gold)
        d = c.decide(b.uids, b.ids, **b.kwargs())
        assert int((d.source == BOUGHT).sum()) == d.labels_bought
        assert c.store.spent(step=step)[0] <= math.ceil(0.2 * len(set(b.uids)))
        m = c.update()
        assert m["train/samples"] >= d.labels_bought
