"""The arithmetic task and its noisy SFT generator."""
import torch

from training.lab.task import (END, OP_MUL, TaskConfig, VOCAB, decode, decode_responses,
                               encode_prompts, encode_responses, noisy_trace, sample_problems,
                               sft_batch, true_answers, true_trace)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_vocab_and_lengths():
    cfg = TaskConfig()
    assert len(VOCAB) == 19 and len(set(VOCAB)) == 19
    pr = sample_problems(5, cfg, _gen())
    assert encode_prompts(pr, cfg).shape == (5, 9) == (5, cfg.prompt_len)
    assert encode_responses(true_trace(pr, cfg)).shape == (5, 8) == (5, cfg.response_len)


def test_true_trace_matches_python_arithmetic():
    cfg = TaskConfig()
    pr = sample_problems(200, cfg, _gen(1))
    trace = true_trace(pr, cfg)
    for i in range(200):
        x = int(pr.x0[i])
        for j in range(3):
            op, a = int(pr.ops[i, j]), int(pr.operands[i, j])
            x = (x + a if op == 0 else x - a if op == 1 else x * a) % 10
            assert int(trace[i, j]) == x
    assert torch.equal(true_answers(pr, cfg), trace[:, -1])


def test_text_format_round_trip():
    cfg = TaskConfig()
    pr = sample_problems(3, cfg, _gen(2))
    prompt = decode(encode_prompts(pr, cfg)[0])
    assert len(prompt) == 8 and prompt[-1] == "=" and prompt[0].isdigit()
    resp = encode_responses(torch.tensor([[1, 6, 8]]))
    assert decode(resp[0]) == "1,6,8#8$"
    assert decode_responses(resp, torch.tensor([5])) == ["1,6,8"]
    assert int(resp[0, -1]) == END


def test_planted_rule_rate_and_noise():
    """One step from the start digit: on '*' the wrong rule (x+a) has p_sys + (1-p_sys)*q/10 and the
    correct value (1-p_sys)(1-q) + (1-p_sys)*q/10, with q = 1-(1-eps)(1-mul_eps) = 0.19 the chance
    of a random digit: 0.5095 vs 0.4145 (tiny_lab.md: "50% vs ~41%"); '+'/'-' are right at 0.91."""
    cfg = TaskConfig(num_ops=1, p_sys=0.5, eps=0.1, mul_eps=0.1)
    gen = _gen(3)
    pr = sample_problems(60000, cfg, gen)
    noisy = noisy_trace(pr, cfg, gen)[:, 0]
    correct = true_trace(pr, cfg)[:, 0]
    wrong = (pr.x0 + pr.operands[:, 0]) % 10
    mul = (pr.ops[:, 0] == OP_MUL) & (wrong != correct)
    p_wrong = (noisy[mul] == wrong[mul]).float().mean().item()
    p_right = (noisy[mul] == correct[mul]).float().mean().item()
    assert abs(p_wrong - 0.5095) < 0.015 and abs(p_right - 0.4145) < 0.015
    assert p_wrong > p_right  # the wrong rule is the per-step mode: the planted belief
    add = pr.ops[:, 0] != OP_MUL
    assert abs((noisy[add] == correct[add]).float().mean().item() - 0.91) < 0.01
    clean = noisy_trace(pr, TaskConfig(num_ops=1, p_sys=0.0, eps=0.0, mul_eps=0.0), gen)[:, 0]
    assert torch.equal(clean, correct)


def test_errors_propagate_and_answer_equals_last_value():
    cfg = TaskConfig(p_sys=1.0, eps=0.0, mul_eps=0.0)  # every '*' uses x + a, nothing else random
    pr = sample_problems(500, cfg, _gen(4))
    tr = noisy_trace(pr, cfg, _gen(5))
    x = pr.x0
    for j in range(3):
        op, a = pr.ops[:, j], pr.operands[:, j]
        x = torch.where(op == 1, x - a, x + a) % 10  # later steps continue from the written value
        assert torch.equal(tr[:, j], x)
    tokens, mask = sft_batch(4, cfg, _gen(6))
    assert tokens.shape == (4, 17) and mask.shape == (4, 16)
    assert mask[:, :8].sum() == 0 and mask[:, 8:].all()  # loss on the 8 response tokens only
    assert torch.equal(tokens[:, -2], tokens[:, -4])  # answer digit == last intermediate value


def test_distinct_problems_have_unique_prompts():
    from training.lab.task import format_prompt, sample_distinct_problems
    cfg = TaskConfig(num_ops=1)  # only 300 distinct problems: 200 draws collide for sure
    pr = sample_distinct_problems(200, cfg, _gen(7))
    texts = format_prompt(pr, cfg)
    assert len(set(texts)) == 200
