"""Hidden-state capture in the CARE policy worker's experience forward: a tiny random-initialised
HF Llama inside OpenRLHF's real ``Actor``, driven through the real ``PolicyModelActor.forward``
(the CARE subclass), padded and packed layouts. The captured vectors must equal the final-norm
output at the last prompt token and the last response token of every sample."""
import pytest
import torch
from types import SimpleNamespace as NS

from care_ext.integrations.openrlhf.capture import feature_positions
from care_ext.integrations.openrlhf.config import ENV_VAR, OpenRLHFCareOptions
from care_ext.integrations.openrlhf.workers import CarePolicyModelActorImpl

PROMPT_LENS = [3, 5, 2]
RESP_LENS = [4, 1, 6]


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


def _batch():
    """Right-padded batch in OpenRLHF's layout: sequences [B, T], attention_mask [B, T],
    action_mask [B, T-1] with 1 where token j+1 is a response token."""
    g = torch.Generator().manual_seed(1)
    B = len(PROMPT_LENS)
    T = max(p + r for p, r in zip(PROMPT_LENS, RESP_LENS))
    seq = torch.zeros(B, T, dtype=torch.long)
    att = torch.zeros(B, T, dtype=torch.long)
    act = torch.zeros(B, T - 1, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(PROMPT_LENS, RESP_LENS)):
        seq[b, : p + r] = torch.randint(3, 40, (p + r,), generator=g)
        att[b, : p + r] = 1
        act[b, p - 1: p + r - 1] = True
    return seq, att, act


def _worker(actor, monkeypatch, **opts):
    monkeypatch.setenv(ENV_VAR, OpenRLHFCareOptions(capture="on", **opts).to_json())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # the stock forward asks for it
    w = CarePolicyModelActorImpl.__new__(CarePolicyModelActorImpl)
    w.actor, w.strategy = actor, NS(ring_attn_group=None)
    return w


def _final_norm(model, run):
    seen = []
    h = model.model.norm.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    try:
        out = run()
    finally:
        h.remove()
    assert len(seen) == 1
    return out, seen[0]


def test_positions_follow_the_action_mask():
    seq, att, act = _batch()
    pp, pr = feature_positions(act, att)
    assert pp.tolist() == [p - 1 for p in PROMPT_LENS]
    assert pr.tolist() == [p + r - 1 for p, r in zip(PROMPT_LENS, RESP_LENS)]
    # a row without generated tokens falls back to its last attended token
    act2 = act.clone()
    act2[1] = False
    pp2, pr2 = feature_positions(act2, att)
    assert pp2[1] == pr2[1] == PROMPT_LENS[1] + RESP_LENS[1] - 1


@pytest.mark.parametrize("packed", [False, True])
def test_captured_vectors_are_final_norm_outputs(tiny_model, monkeypatch, packed):
    from openrlhf.models import Actor

    actor = Actor(tiny_model)
    actor.packing_samples = packed
    w = _worker(actor, monkeypatch)
    seq, att, act = _batch()
    logp, normed = _final_norm(tiny_model, lambda: w.forward(seq, act, att))
    feats = w.care_pop_features()
    assert len(feats) == 1 and w.care_pop_features() == []
    f = feats[0]
    H = tiny_model.config.hidden_size
    assert f.h_prompt.shape == (3, H) and f.h_resp.shape == (3, H)
    starts = torch.tensor([0] + list(torch.cumsum(att.sum(1), 0)[:-1]))
    for b, (p, r) in enumerate(zip(PROMPT_LENS, RESP_LENS)):
        if packed:  # [1, nnz, H]: row b's tokens start after the attended tokens of rows < b
            assert normed.shape[:2] == (1, int(att.sum()))
            want_p, want_r = normed[0, starts[b] + p - 1], normed[0, starts[b] + p + r - 1]
        else:
            want_p, want_r = normed[b, p - 1], normed[b, p + r - 1]
        torch.testing.assert_close(f.h_prompt[b], want_p, rtol=0, atol=0)
        torch.testing.assert_close(f.h_resp[b], want_r, rtol=0, atol=0)
    # the capture does not change what the stock forward returns
    actor.eval()
    with torch.no_grad():
        stock = actor(seq, act, att)
    torch.testing.assert_close(logp, stock)
    assert f.checksum.tolist() == (seq * att).sum(1).tolist()


def test_feature_dtype_cast_and_capture_off(tiny_model, monkeypatch):
    from openrlhf.models import Actor

    actor = Actor(tiny_model)
    actor.packing_samples = False
    w = _worker(actor, monkeypatch, feature_dtype="bfloat16")
    seq, att, act = _batch()
    w.forward(seq, act, att)
    f = w.care_pop_features()[0]
    assert f.h_prompt.dtype == torch.bfloat16 and f.h_resp.dtype == torch.bfloat16
    monkeypatch.setenv(ENV_VAR, OpenRLHFCareOptions(core={"strategy": "ttrl"}).to_json())
    w2 = CarePolicyModelActorImpl.__new__(CarePolicyModelActorImpl)
    w2.actor, w2.strategy = actor, NS(ring_attn_group=None)
    w2.forward(seq, act, att)
    assert w2.care_pop_features() == []  # ttrl needs no hidden states: capture 'auto' is off


@pytest.mark.parametrize("ring", [2, 3])
def test_ring_attention_slices_give_the_same_features(tmp_path, ring):
    """R gloo processes, each holding its ring slice of the packed hidden states (as OpenRLHF's
    ring-attention slicing assigns the tokens): every rank gets exactly the unsliced features."""
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "ring_capture_worker", str(r), str(ring), str(port),
                               str(tmp_path / f"r{r}.json")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=str(tmp_path)) for r in range(ring)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [log[-3000:] for log in logs]
    for r in range(ring):
        res = json.loads((tmp_path / f"r{r}.json").read_text())
        assert "must be [1," in res.pop("bad_slice")
        assert len(res) == 6
        for key, v in res.items():
            assert v["equal"], (r, key, v)
            assert v["dtype"] == key.split("/")[1]
        assert any(v["pad"] > 0 for v in res.values())  # the uneven case (ring padding) is covered


def test_worker_hands_its_ring_group_to_the_capture(tiny_model, monkeypatch):
    from care_ext.integrations.openrlhf import workers

    seen = {}

    def fake_capture(actor, run, sequences, action_mask, attention_mask, feature_dtype, ring_group=None,
                     projection=None):
        seen["ring_group"] = ring_group
        return run(), None
    monkeypatch.setattr(workers, "capture_forward", fake_capture)
    from openrlhf.models import Actor

    actor = Actor(tiny_model)
    actor.packing_samples = False  # the padded Actor never touches the (stand-in) group
    w = _worker(actor, monkeypatch)
    w.strategy = NS(ring_attn_group="the-ring-group")
    seq, att, act = _batch()
    w.forward(seq, act, att)
    assert seen["ring_group"] == "the-ring-group"
