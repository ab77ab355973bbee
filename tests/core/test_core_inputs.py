"""Bad input gives a clear error or the documented fallback, never a silent wrong decision."""
import math

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
        care(batch, repeated_uids="error").decide(uids, batch.ids, **batch.kwargs())
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


@pytest.mark.parametrize("field,value", [
    ("group_size", 2.0), ("hidden_size", 0), ("global_budget", 2.5), ("global_budget", True),
    ("warmup_steps", -1), ("prompt_dim", 0), ("resp_hidden_dim", -3), ("train_steps", -1),
    ("replay_capacity", -5), ("replay_batch", -1), ("seed", 1.5),
    ("soft_adv", math.nan), ("decay_lambda", -1.0), ("adv_eps", -1.0), ("cag_eps", math.nan),
    ("aux_weight", -1.0), ("class_balance_power", -0.5), ("lr", math.inf), ("weight_decay", -0.1),
    ("grad_clip", math.nan), ("use_cached_labels", "no"), ("adv_unbiased", 1),
    ("class_weight_clip", (4.0, 0.25)), ("class_weight_clip", (0.25,)),
    ("class_weight_clip", (-1.0, 4.0))])
def test_config_rejects_bad_values_by_name(field, value):
    """Each of these used to be accepted and either silently change the run (negative
    train_steps = no training, 'no' = True, a reversed clip, NaN eps -> NaN scores) or fail
    steps later with an unrelated message."""
    with pytest.raises(ValueError, match=field):
        CareConfig(**{field: value})


def test_config_accepts_the_documented_edge_values():
    cfg = CareConfig(group_size=1, hidden_size=None, global_budget=0, warmup_steps=0, train_steps=0,
                     replay_capacity=0, replay_batch=0, aux_weight=0.0, class_balance_power=0,
                     grad_clip=0.0, cag_eps=0.0, soft_adv=0, class_weight_clip=[1.0, 1.0])
    assert cfg.class_weight_clip == (1.0, 1.0)
    assert CareConfig.from_dict(CareConfig().to_dict()) == CareConfig()


def test_dropped_nonfinite_rows_stay_out_of_the_feature_monitors(batch):
    """Under nonfinite='drop' the bad rows' lengths (NaN, Inf) and the classifier outputs on
    their zeroed features must not enter care/length_mean, care/reliability_mean, care/ecag_mean
    (a NaN mean used to make the monitor vanish, an Inf one to read inf)."""
    kw = batch.kwargs()
    kw["lengths"] = kw["lengths"].double().clone()
    kw["lengths"][3, 0] = float("nan")
    kw["lengths"][5, 2] = float("inf")
    d = care(batch, nonfinite="drop").decide(batch.uids, batch.ids, **kw)
    ok = [i for i in range(B) if i not in (3, 5)]
    assert d.metrics["care/length_mean"] == pytest.approx(float(batch.lengths[ok].double().mean()))
    assert d.metrics["care/reliability_mean"] == pytest.approx(float(d.reliability[ok].double().mean()))
