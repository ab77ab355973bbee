"""Model shapes, KV-cached sampling, and the hidden states captured by the scoring forward."""
import torch

from training.lab.model import ModelConfig, TinyGPT
from training.lab.rollout import finalize_responses, sample_responses, sample_rollouts
from training.lab.task import END, PAD, TaskConfig, encode_prompts, sample_problems

torch.set_num_threads(1)


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyGPT(ModelConfig()).eval()


def test_parameter_count_and_shapes():
    m = _model()
    assert m.num_parameters() == 405_760  # tiny_lab.md: 2 layers, d 128, untied head, no bias
    logits, hidden = m(torch.zeros(3, 17, dtype=torch.long))
    assert logits.shape == (3, 17, 19) and hidden.shape == (3, 17, 128)
    assert torch.allclose(logits, hidden @ m.head.weight.T, atol=1e-5)


def test_kv_cache_matches_full_forward():
    m = _model(1)
    toks = torch.randint(0, 17, (4, 14))
    full, hid = m(toks)
    logits, h, cache = m.forward_cached(toks[:, :9], None)
    steps, hs = [logits[:, -1]], [h[:, -1]]
    for t in range(9, 14):
        logits, h, cache = m.forward_cached(toks[:, t:t + 1], cache)
        steps.append(logits[:, -1])
        hs.append(h[:, -1])
    assert torch.allclose(torch.stack(steps, 1), full[:, 8:], atol=1e-5)
    assert torch.allclose(torch.stack(hs, 1), hid[:, 8:], atol=1e-5)


def test_finalize_cuts_at_first_end_mark():
    raw = torch.tensor([[1, END, 3, END], [1, 2, 3, 4]])
    resp, lengths = finalize_responses(raw)
    assert lengths.tolist() == [2, 4]
    assert resp[0].tolist() == [1, END, PAD, PAD] and resp[1].tolist() == [1, 2, 3, 4]


def test_rollout_hidden_states_are_final_norm_outputs_at_the_right_positions():
    m = _model(2)
    cfg = TaskConfig()
    prompts = encode_prompts(sample_problems(3, cfg, torch.Generator().manual_seed(0)), cfg)
    ro = sample_rollouts(m, prompts, 4, 9, 1.0, torch.Generator().manual_seed(1))
    assert ro.h_prompt.shape == (3, 128) and ro.h_resp.shape == (3, 4, 128)
    # capture the final LayerNorm output with a hook on an independent forward
    captured = {}
    handle = m.ln_f.register_forward_hook(lambda mod, inp, out: captured.__setitem__("h", out))
    seq = torch.cat([ro.rollout_prompts, ro.responses], 1)
    with torch.no_grad():
        m(seq)
    handle.remove()
    h = captured["h"]
    for b in range(3):
        assert torch.allclose(ro.h_prompt[b], h[b * 4, 8], atol=1e-5)  # the '=' position
        for g in range(4):
            row = b * 4 + g
            last = 9 + int(ro.lengths[row]) - 1  # the end mark (or last sampled token)
            assert torch.allclose(ro.h_resp[b, g], h[row, last], atol=1e-5)
    # log-probs equal those of a plain forward, zero beyond the length
    with torch.no_grad():
        logits, _ = m(seq)
    lp = torch.log_softmax(logits[:, 8:17], -1).gather(-1, ro.responses[..., None]).squeeze(-1)
    assert torch.allclose(ro.old_logprobs, lp * ro.mask, atol=1e-5)
    assert (ro.old_logprobs[~ro.mask] == 0).all()


def test_greedy_sampling_is_deterministic_and_matches_argmax():
    m = _model(3)
    prompts = torch.randint(0, 10, (2, 9))
    a, la = sample_responses(m, prompts, 5, 0.0, None)
    seq = prompts
    for _ in range(5):
        seq = torch.cat([seq, m(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    ref, lr = finalize_responses(seq[:, 9:])
    assert torch.equal(a, ref) and torch.equal(la, lr)
