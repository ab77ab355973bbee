"""``--care.worker_reduce first_layer`` end to end on a local CPU Ray cluster: a real RayActorGroup
of two CARE policy workers (tiny Llama models), OpenRLHF's stock make_experience dispatching the
forwards, the trainer sending each step's projection and fetching back only the trained prompts'
raw rows. The run must decide, weight and train exactly like the run that ships raw hidden states.
Plus the worker methods on a real Actor forward, and the option checks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from care_ext.classifiers import stage1_classifier, stage2_classifier
from care_ext.config import CareConfig
from care_ext.decision import BOUGHT, CACHED
from care_ext.integrations.openrlhf.capture import feature_positions
from care_ext.integrations.openrlhf.config import OpenRLHFCareOptions
from care_ext.projection import first_layer_projection

from test_openrlhf_capture import _batch, _final_norm, _worker, tiny_model  # noqa: F401

HELPERS = Path(__file__).resolve().parent / "helpers"


def _run(mode, tmp_path):
    out = tmp_path / f"{mode}.json"
    r = subprocess.run([sys.executable, str(HELPERS / "reduce_experience_run.py"), mode, str(out)],
                       capture_output=True, text=True, timeout=540, cwd=str(tmp_path),
                       env=dict(os.environ, RAY_DEDUP_LOGS="0"))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-5000:])
    return json.loads(out.read_text())["steps"]


def test_reduced_run_matches_raw_run_on_ray_workers(tmp_path):
    raw, red = _run("off", tmp_path), _run("first_layer", tmp_path)
    assert len(raw) == len(red) == 3
    for s, (a, b) in enumerate(zip(raw, red)):
        assert a["source"] == b["source"] and a["rewards"] == b["rewards"], s
        # trust weights and reliabilities are continuous: equal to float32 rounding
        for key in ("weight", "reliability"):
            torch.testing.assert_close(torch.tensor(b[key]), torch.tensor(a[key]), rtol=1e-5, atol=1e-6)
        for ea, eb in zip(a["adv"], b["adv"]):
            torch.testing.assert_close(torch.tensor(eb), torch.tensor(ea), rtol=1e-5, atol=1e-6)
        for k, v in a["classifier"].items():
            assert b["classifier"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (s, k)
        assert a["fetches"] == []
    assert red[0]["fetches"] == []  # step 0: no classifiers yet, the workers ship raw states
    for s in (1, 2):
        f = red[s]["fetches"]
        assert len(f) == 1  # one round trip per step: 1 prompt state and G response states per trained prompt
        n_trained = sum(src in (BOUGHT, CACHED) for src in red[s]["source"])  # train_on_cached: default True
        assert len(f[0]["prompt_pairs"]) == n_trained > 0 and len(f[0]["resp_pairs"]) == 4 * n_trained
        # the 3 micro-batches (5, 5, 2 rows) live on both DP ranks: blocks 0-1 on worker 0, 2 on worker 1
        assert [tuple(o) for o in f[0]["owners"]] == [(0, 0), (0, 1), (1, 0)]


def _projection(H, version):
    """A first-layer projection of freshly initialised CARE classifiers (G = 4)."""
    cfg = CareConfig(group_size=4)
    return first_layer_projection(stage1_classifier(H, 4, cfg).fold(), stage2_classifier(H, 4, cfg).fold(),
                                  H, version)


@pytest.mark.parametrize("feature_dtype,packed", [("native", False), ("bfloat16", False), ("native", True)])
def test_worker_projects_on_device_and_serves_raw_rows(tiny_model, monkeypatch, feature_dtype, packed):  # noqa: F811
    from openrlhf.models import Actor

    actor = Actor(tiny_model)
    actor.packing_samples = packed
    w = _worker(actor, monkeypatch, worker_reduce="first_layer", feature_dtype=feature_dtype)
    H = tiny_model.config.hidden_size
    torch.manual_seed(1)
    proj = _projection(H, 5)
    seq, att, act = _batch()
    w.forward(seq, act, att)  # no projection set yet: raw
    w.care_set_projection(proj)
    _, normed = _final_norm(tiny_model, lambda: w.forward(seq, act, att))
    first, second = w.care_pop_features()
    assert first.version is None and first.h_prompt.shape == (3, H) and first.raw is None
    assert second.version == 5 and second.raw is None  # raw rows stay on the worker
    assert second.h_prompt.shape == (3, 256) and second.h_resp.shape == (3, 128)
    assert second.h_prompt.dtype == torch.float32
    pos_p, pos_r = feature_positions(act, att)
    if packed:  # [1, nnz, H]: row b's tokens start after the attended tokens of rows < b
        start = torch.cumsum(att.sum(1), 0) - att.sum(1)
        rows_p, rows_r = normed[0, start + pos_p], normed[0, start + pos_r]
    else:
        rows_p, rows_r = normed[torch.arange(3), pos_p], normed[torch.arange(3), pos_r]
    if feature_dtype == "bfloat16":
        rows_p, rows_r = rows_p.bfloat16(), rows_r.bfloat16()
    torch.testing.assert_close(second.h_prompt, rows_p.float() @ proj.prompt_w.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second.h_resp, rows_r.float() @ proj.resp_w.T, rtol=1e-5, atol=1e-6)
    hp, hr = w.care_fetch_raw([(1, 2)], [(1, 2), (1, 0), (1, 1)])
    assert torch.equal(hp, rows_p[[2]]) and torch.equal(hr, rows_r[[2, 0, 1]])
    hp, hr = w.care_fetch_raw([], [(1, 1)])
    assert hp is None and torch.equal(hr, rows_r[[1]])
    with pytest.raises(ValueError, match="block 0 holds no raw rows"):
        w.care_fetch_raw([(0, 0)], [])  # that block was shipped raw
    w.care_pop_features()  # the next step's pop replaces what can be fetched
    with pytest.raises(ValueError, match="block 1 holds no raw rows"):
        w.care_fetch_raw([], [(1, 0)])
    w.care_set_projection(None)
    w.forward(seq, act, att)
    assert w.care_pop_features()[0].version is None


def test_worker_reduce_option_checks(tiny_model, monkeypatch):  # noqa: F811
    with pytest.raises(ValueError, match="capture is off"):
        OpenRLHFCareOptions(worker_reduce="first_layer", core={"strategy": "ttrl"})
    with pytest.raises(ValueError, match="capture is off"):
        OpenRLHFCareOptions(worker_reduce="first_layer", capture="off")
    with pytest.raises(ValueError, match="worker_reduce must be one of"):
        OpenRLHFCareOptions(worker_reduce="gpu")
    from openrlhf.models import Actor

    w = _worker(Actor(tiny_model), monkeypatch)
    with pytest.raises(RuntimeError, match="worker_reduce off"):
        w.care_set_projection(_projection(tiny_model.config.hidden_size, 0))
