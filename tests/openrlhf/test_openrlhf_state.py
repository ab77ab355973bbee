"""CARE state saved with OpenRLHF's checkpoints and restored on resume: a resumed run decides
exactly as the uninterrupted one; the trainer hooks save/load at OpenRLHF's checkpoint steps."""
import json

import pytest
import torch
from types import SimpleNamespace as NS

from test_openrlhf_experience import G, _after_forward, _args, _maker, _rollouts, tok, clusterer  # noqa: F401

from care_ext.integrations.openrlhf.capture import CapturedFeatures, sequence_checksum
from care_ext.integrations.openrlhf.config import OpenRLHFCareOptions
from care_ext.integrations.openrlhf.runner import CareRunner

H = 8


def _step(tok, runner, seed):
    maker = _maker(tok, _args(), runner)
    exps = _after_forward(maker.split_rollout_samples(_rollouts(tok)))
    g = torch.Generator().manual_seed(seed)
    feats = [CapturedFeatures(torch.randn(e.sequences.shape[0], H, generator=g),
                              torch.randn(e.sequences.shape[0], H, generator=g),
                              sequence_checksum(e.sequences, e.attention_mask)) for e in exps]
    return runner.decide(exps, feats)


def _runner(tok, clusterer, tmp_path):
    opts = OpenRLHFCareOptions(core={"strategy": "care", "warmup_steps": 0, "alpha": 0.34,
                                     "budget_frac": 0.34, "seed": 3})
    return CareRunner(opts, G, tok, str(tmp_path), clusterer=clusterer)


def test_state_round_trip_resumes_identically(tok, clusterer, tmp_path):
    a = _runner(tok, clusterer, tmp_path)
    _step(tok, a, seed=0)
    a.after_policy_update()
    path = a.save(global_step=1)
    assert path.name == "care_state_global_step1.pt" and path.exists()
    d_a = _step(tok, a, seed=1)
    m_a = a.after_policy_update()

    b = _runner(tok, clusterer, tmp_path)  # same label store (it persists by itself)
    assert b.load(global_step=1)
    d_b = _step(tok, b, seed=1)
    m_b = b.after_policy_update()
    assert torch.equal(d_a.source, d_b.source)
    assert torch.equal(d_a.rewards, d_b.rewards) and torch.equal(d_a.weight, d_b.weight)
    assert torch.equal(d_a.reliability, d_b.reliability)
    assert {k: v for k, v in m_a.items() if "classifier" in k} == {k: v for k, v in m_b.items() if "classifier" in k}
    a.close()
    b.close()


def test_missing_state_on_resume(tok, clusterer, tmp_path):
    r = _runner(tok, clusterer, tmp_path)
    with pytest.raises(FileNotFoundError, match="no CARE state"):
        r.load(global_step=7)
    r.options.require_state_on_resume = False
    with pytest.warns(RuntimeWarning):
        assert r.load(global_step=7) is False


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_trainer_saves_with_checkpoints_and_loads_on_resume(tok, clusterer, tmp_path, monkeypatch, mode):
    from care_ext.integrations.openrlhf import trainer as T

    impl, stock = ((T.CarePPOTrainerImpl, T._STOCK_TRAINER) if mode == "sync"
                   else (T.CareTrainingActorImpl, T._STOCK_TRAINING_ACTOR))
    saved_steps = []
    monkeypatch.setattr(stock, "save_logs_and_checkpoints", lambda self, *a, **k: saved_steps.append(a[0]))
    monkeypatch.setattr(stock, "init_checkpoint_states", lambda self: {"global_step": 2, "episode": 0})
    t = impl.__new__(impl)
    t.args = NS(ckpt=NS(save_steps=2, max_num=1, path=str(tmp_path)))  # no _actor folder
    t.care = _runner(tok, clusterer, tmp_path)
    _step(tok, t.care, seed=0)
    t.care.after_policy_update()
    for step in (1, 2, 3, 4):
        t.save_logs_and_checkpoints(step, {}, {})
    assert saved_steps == [1, 2, 3, 4]
    files = sorted(p.name for p in t.care.state_dir.glob("care_state_*.pt"))
    assert files == ["care_state_global_step4.pt"]  # every save_steps, newest --ckpt.max_num kept
    with pytest.raises(FileNotFoundError):  # resuming step 2, whose CARE state was pruned
        t.init_checkpoint_states()
    t.care.save(2)
    assert t.init_checkpoint_states()["global_step"] == 2
    assert t.care.controller.step == 1
    t.care.close()


def test_every_resumable_checkpoint_has_its_care_state(tmp_path):
    """OpenRLHF's real checkpoint path (helpers/ckpt_resume_run.py: the CARE trainer on
    BasePPOTrainer's save/resume methods, PolicyModelActor.save_checkpoint, DeepspeedStrategy's
    save_ckpt/load_ckpt on a one-rank CPU DeepSpeedEngine), four runs, each resumed afterwards:

    * best-metric checkpoints (``best_global_step{N}``, saved with DeepSpeed's ``latest``) get
      CARE's state too, so resuming from the newest (a best one) finds it;
    * OpenRLHF evicts regular checkpoints by their stored metric, not by age; CARE keeps exactly
      the states of the checkpoints OpenRLHF still holds, so rolling ``latest`` back to a kept
      older checkpoint resumes CARE at that step;
    * async mode's lagging eval (the best tag names the eval step, the state is the current one).
    """
    import json
    import subprocess
    import sys
    from pathlib import Path

    helper = Path(__file__).resolve().parent / "helpers" / "ckpt_resume_run.py"
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, str(helper), str(out), str(tmp_path)], capture_output=True,
                       text=True, timeout=540, cwd=str(tmp_path), check=False)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads(out.read_text())
    expected = {"best_is_latest": ("best_global_step30", 30),
                "only_best": ("best_global_step5", 5),
                "evicted_by_metric": ("global_step2", 2),
                "async_eval_lags": ("best_global_step4", 5)}
    for name, (latest, step) in expected.items():
        run = res[name]
        assert run["care_files"] == [f"care_state_{t}.pt" for t in run["ds_tags"]], (name, run)
        assert run["latest"] == latest, (name, run)
        assert run["resume"] == {"global_step": step, "care_step": step}, (name, run)
    kept = res["evicted_by_metric"]["ds_tags"]  # global_step3 (metric 0.1) went, not 2 (0.9)
    assert kept == ["best_global_step1", "global_step2", "global_step4"]


def _random_runner(tok, clusterer, path, seed):
    opts = OpenRLHFCareOptions(core={"strategy": "random", "budget_frac": 0.34, "seed": seed})
    return CareRunner(opts, G, tok, str(path), clusterer=clusterer)


def _decide(tok, runner):
    maker = _maker(tok, _args(), runner)
    return runner.decide(_after_forward(maker.split_rollout_samples(_rollouts(tok))), None)


def test_a_crash_before_the_first_checkpoint_keeps_the_step_caps(tok, clusterer, tmp_path):
    """Run A buys ceil(0.34 * 3) = 2 labels at step 0 and dies before any checkpoint. A restart
    that continues A's run id (resume_without_state) reruns step 0 under A's cap: nothing more
    is charged. A restart as a new run (the old behaviour, here on a copy of the files) picks
    the third prompt and pays for it: 3 labels at one step."""
    import shutil

    from care_ext.integrations.openrlhf.runner import RUN_ID_FILE

    first, copy = tmp_path / "a", tmp_path / "copy"
    a = _random_runner(tok, clusterer, first, seed=0)
    fresh = _random_runner(tok, clusterer, tmp_path / "none", seed=0)
    assert fresh.resume_without_state() is None  # nothing recorded there
    _decide(tok, a)
    assert a.controller.store.spent() == (2, 2.0)
    run_a = a.controller.run_id
    a.close()
    shutil.copytree(first, copy)
    assert json.loads((first / "care" / RUN_ID_FILE).read_text()) == {"run_id": run_a}

    b = _random_runner(tok, clusterer, first, seed=1)  # other rollouts, other picks
    assert b.resume_without_state() == run_a == b.controller.run_id
    _decide(tok, b)
    assert b.controller.store.spent() == (2, 2.0)

    c = _random_runner(tok, clusterer, copy, seed=1)
    _decide(tok, c)
    assert c.controller.store.spent() == (3, 3.0)
    assert json.loads((copy / "care" / RUN_ID_FILE).read_text()) == {"run_id": c.controller.run_id}
    (copy / "care" / RUN_ID_FILE).write_text("{}")
    with pytest.raises(ValueError, match="not a CARE run-id record"):
        _random_runner(tok, clusterer, copy, seed=1).resume_without_state()
    for r in (b, c, fresh):
        r.close()


@pytest.mark.parametrize("load_enable", [True, False])
def test_trainer_continues_the_run_id_when_resuming_without_a_checkpoint(
        tok, clusterer, tmp_path, monkeypatch, load_enable):
    from care_ext.integrations.openrlhf import trainer as T

    a = _random_runner(tok, clusterer, tmp_path, seed=0)
    _decide(tok, a)
    a.close()
    monkeypatch.setattr(T._STOCK_TRAINER, "init_checkpoint_states",
                        lambda self: {"global_step": 0, "episode": 0})
    t = T.CarePPOTrainerImpl.__new__(T.CarePPOTrainerImpl)
    t.args = NS(ckpt=NS(load_enable=load_enable, path=str(tmp_path)))
    t.care = _random_runner(tok, clusterer, tmp_path, seed=0)
    new_id = t.care.controller.run_id
    if load_enable:
        with pytest.warns(RuntimeWarning, match=f"continues run {a.controller.run_id}"):
            t.init_checkpoint_states()
        assert t.care.controller.run_id == a.controller.run_id
    else:
        t.init_checkpoint_states()
        assert t.care.controller.run_id == new_id != a.controller.run_id
    t.care.close()
