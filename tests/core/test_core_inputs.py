"""Bad input gives a clear error or the documented fallback, never a silent wrong decision."""
import pytest
import torch

from care_ext.config import CareConfig
from care_ext.decision import DROPPED
from care_ext.labels import GoldOracle
from care_ext.step import CareController

from core_synth import make_batch, make_world

B, G, H = 16, 8, 16


@pytest.fixture
def batch():
    return make_batch(make_world(B=B, G=G, H=H), 0)


def care(batch, **kw):
    return CareController(CareConfig(strategy="care", group_size=G, warmup_steps=0, **kw),
                          GoldOracle(batch.gold))


@pytest.mark.parametrize("field", ["h_prompt", "h_resp", "lengths"])
def test_nonfinite_features_error_or_drop(batch, field):
    kw = batch.kwargs()
    kw[field] = kw[field].float().clone()
    kw[field][3] = float("nan")
    kw[field][5] = float("inf")
    with pytest.raises(ValueError, match=rf"{field} has NaN/Inf.*\[3, 5\]"):
        care(batch).decide(batch.uids, batch.ids, **kw)
    c = care(batch, nonfinite="drop")
    d = c.decide(batch.uids, batch.ids, **kw)
    assert d.source[3] == DROPPED and d.source[5] == DROPPED and d.weight[[3, 5]].eq(0).all()
    assert torch.isfinite(d.reliability).all() and torch.isfinite(d.advantages).all()
    assert batch.uids[3] not in c.store.get(batch.uids)  # never bought


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_large_finite_hidden_states_are_not_flagged(batch, dtype):
    """The finiteness check sums each row first; a finite row whose sum overflows (float16 max
    65504, bf16/fp32 values near 3e38) must still pass, a NaN in an overflowing row must not."""
    kw = batch.kwargs()
    big = torch.finfo(dtype).max
    kw["h_resp"] = kw["h_resp"].to(dtype).clone()
    kw["h_resp"][2] = big
    kw["h_resp"][4] = big
    kw["h_resp"][4, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"h_resp has NaN/Inf in rows \[4\]"):
        care(batch).decide(batch.uids, batch.ids, **kw)


def test_negative_lengths_are_rejected(batch):
    kw = batch.kwargs()
    kw["lengths"] = kw["lengths"].clone()
    kw["lengths"][2, 1] = -4
    with pytest.raises(ValueError, match="negative"):
        care(batch).decide(batch.uids, batch.ids, **kw)


def test_wrong_group_size_hidden_size_and_dtype(batch):
    with pytest.raises(ValueError, match="group_size = 4"):
        CareController(CareConfig(strategy="ttrl", group_size=4), GoldOracle({})).decide(batch.uids, batch.ids)
    with pytest.raises(ValueError, match="int64"):
        care(batch).decide(batch.uids, batch.ids.int(), **batch.kwargs())
    c = care(batch, hidden_size=H + 1)
    with pytest.raises(ValueError, match="h_prompt must be"):
        c.decide(batch.uids, batch.ids, **batch.kwargs())
    with pytest.raises(ValueError, match="needs h_prompt"):
        care(batch).decide(batch.uids, batch.ids, lengths=batch.lengths)


def test_duplicate_uids_and_count_mismatch(batch):
    uids = list(batch.uids)
    uids[7] = uids[2]
    with pytest.raises(ValueError, match=f"duplicate prompt uids.*{uids[2]}"):
        care(batch).decide(uids, batch.ids, **batch.kwargs())
    with pytest.raises(ValueError, match="15 uids"):
        care(batch).decide(batch.uids[:-1], batch.ids, **batch.kwargs())


def test_empty_batch_is_an_empty_decision(batch):
    c = care(batch, hidden_size=H)
    d = c.decide([], torch.zeros(0, G, dtype=torch.long), lengths=torch.zeros(0, G),
                 h_prompt=torch.zeros(0, H), h_resp=torch.zeros(0, G, H))
    assert d.source.shape == (0,) and d.rewards.shape == (0, G) and d.labels_bought == 0
    assert c.update() == {"train/samples": 0.0} and c.step == 1


def test_decide_and_update_must_alternate(batch):
    c = care(batch)
    with pytest.raises(RuntimeError, match="without a preceding decide"):
        c.update()
    c.decide(batch.uids, batch.ids, **batch.kwargs())
    with pytest.raises(RuntimeError, match="twice without update"):
        c.decide(batch.uids, batch.ids, **batch.kwargs())


def test_labels_need_a_resolver_unless_they_are_answer_ids(batch):
    gold = {u: f"answer {g}" for u, g in batch.gold.items()}
    c = CareController(CareConfig(strategy="gt", group_size=G), GoldOracle(gold))
    with pytest.raises(TypeError, match="resolve_label"):
        c.decide(batch.uids, batch.ids)
    c = CareController(CareConfig(strategy="gt", group_size=G), GoldOracle(gold),
                       resolve_label=lambda label, payload: int(label.split()[1]))
    d = c.decide(batch.uids, batch.ids)
    assert torch.equal(d.gold_ids, torch.tensor([batch.gold[u] for u in batch.uids]))


def test_config_validation():
    with pytest.raises(ValueError, match="budget_frac"):
        CareConfig(budget_frac=1.5)
    with pytest.raises(ValueError, match="trust_weight"):
        CareConfig(trust_weight="exp")
    with pytest.raises(ValueError, match="unknown strategy"):
        CareController(CareConfig(strategy="nope"), GoldOracle({}))
