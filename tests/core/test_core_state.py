"""Save/restore: a resumed run makes exactly the decisions of an uninterrupted one."""
import pytest
import torch

from care_ext.config import CareConfig
from care_ext.labels import DelayedGoldOracle, GoldOracle
from care_ext.step import CareController

from core_synth import make_batch, make_world

B, G, H = 24, 8, 16


@pytest.mark.parametrize("strategy,oracle_kind", [("care", "gold"), ("care-regression", "delayed"),
                                                  ("random", "gold")])
def test_resume_matches_uninterrupted_run(tmp_path, strategy, oracle_kind):
    world = make_world(B=B, G=G, H=H)
    batches = [make_batch(world, s % 4) for s in range(7)]  # prompts recur: cache hits too
    gold = {u: g for b in batches for u, g in b.gold.items()}

    def controller(store):
        oracle = GoldOracle(gold) if oracle_kind == "gold" else DelayedGoldOracle(gold, delay_steps=1)
        cfg = CareConfig(strategy=strategy, group_size=G, warmup_steps=2, audit_frac=0.25, seed=5)
        return CareController(cfg, oracle, store)

    def steps(ctl, lo, hi):
        out = []
        for s in range(lo, hi):
            b = batches[s]
            d = ctl.decide(b.uids, b.ids, **b.kwargs())
            m = ctl.update()
            out.append((d, m))
        return out

    ref_ctl = controller(tmp_path / "a.sqlite")
    ref = steps(ref_ctl, 0, 7)
    first = controller(tmp_path / "b.sqlite")
    steps(first, 0, 3)
    first.save(tmp_path / "ckpt.pt")
    first.store.close()
    resumed = controller(tmp_path / "b.sqlite")
    resumed.load(tmp_path / "ckpt.pt")
    got = steps(resumed, 3, 7)
    for (d, m), (d_ref, m_ref) in zip(got, ref[3:]):
        assert torch.equal(d.source, d_ref.source)
        assert torch.equal(d.rewards, d_ref.rewards) and torch.equal(d.weight, d_ref.weight)
        assert torch.equal(d.score.nan_to_num(-1), d_ref.score.nan_to_num(-1))
        assert m == m_ref  # identical classifier training (weights, optimisers, replay, RNG)
        assert d.metrics == d_ref.metrics
    if strategy.startswith("care"):
        assert len(resumed.trainer.replay1) == len(ref_ctl.trainer.replay1) > 0
        for k, v in ref_ctl.trainer.stage2.state_dict().items():
            assert torch.equal(v, resumed.trainer.stage2.state_dict()[k])


def test_load_rejects_another_strategy(tmp_path):
    c = CareController(CareConfig(strategy="ttrl", group_size=G), GoldOracle({}))
    c.save(tmp_path / "x.pt")
    other = CareController(CareConfig(strategy="random", group_size=G), GoldOracle({}))
    with pytest.raises(ValueError, match="strategy"):
        other.load(tmp_path / "x.pt")


@pytest.mark.parametrize("hidden_size", [None, H])
def test_loading_a_checkpoint_from_before_the_classifiers_existed_resets_them(tmp_path, hidden_size):
    """A checkpoint taken before the first decide holds no trained classifiers. Loading it into a
    controller that has already trained must restore the untrained state of a new run, not keep
    the trained classifiers (the resumed run would decide differently)."""
    world = make_world(B=B, G=G, H=H)
    batches = [make_batch(world, s) for s in range(3)]
    gold = {u: g for b in batches for u, g in b.gold.items()}

    def controller():
        return CareController(CareConfig(strategy="care", group_size=G, warmup_steps=0,
                                         hidden_size=hidden_size), GoldOracle(gold))

    controller().save(tmp_path / "start.pt")
    used = controller()
    for b in batches[:2]:
        used.decide(b.uids, b.ids, **b.kwargs())
        used.update()
    used.load(tmp_path / "start.pt")
    new = controller()
    b = batches[2]
    d, d_new = used.decide(b.uids, b.ids, **b.kwargs()), new.decide(b.uids, b.ids, **b.kwargs())
    assert torch.equal(d.reliability, d_new.reliability) and torch.equal(d.score, d_new.score)
    assert len(used.trainer.replay1) == 0
