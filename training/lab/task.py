"""Chained modular arithmetic with written-out traces, and the noisy SFT data that plants a wrong belief.

A problem is a start digit x0 followed by K operations (operator in {+, -, *}, single-digit operand):
the prompt "7*3+5-8=" asks for the chain ((7*3)+5)-8 evaluated mod 10 step by step. The response
writes the K intermediate values separated by commas, then '#', the answer digit and the end mark
'$': "1,6,8#8$". Tokens are single characters (19 symbols including BOS and PAD).

The supervised data is noisy (tiny_lab.md §1): on a '*' step the value is computed with the wrong
rule (x + a) mod 10 with probability ``p_sys``; otherwise it is the correct value, replaced by a
uniformly random digit with probability ``eps`` (every step) and, on a '*' step, once more with
probability ``mul_eps``. Later steps continue from the (possibly wrong) value, and the answer always
equals the last written value.

Why ``mul_eps``: tiny_lab.md states the per-step odds on '*' as 50% wrong rule vs ~41% correct
(p_sys = 0.5) and 40% vs ~50% (p_sys = 0.4), i.e. correct = (1 - p_sys)(1 - eps)^2, and its
Monte-Carlo check of the ideal distribution gives mean@8 0.46 / maj@8 0.57. Only a second random
error on the non-systematic '*' branch reproduces those figures (0.461 / 0.572 here; 0.484 / 0.603
and a 0.505 vs 0.455 per-step margin with ``mul_eps`` = 0, where the trained model's greedy answer
on '*' problems is then right 26% of the time instead of ~9%).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DIGITS = "0123456789"
OPERATORS = "+-*"
EQUALS, COMMA, ANSWER_MARK, END_MARK = "=", ",", "#", "$"
BOS_CHAR, PAD_CHAR = "^", "_"
VOCAB = DIGITS + OPERATORS + EQUALS + COMMA + ANSWER_MARK + END_MARK + BOS_CHAR + PAD_CHAR
"""The 19 single-character tokens; a token id is the index into this string."""
STOI = {c: i for i, c in enumerate(VOCAB)}
BOS, PAD, END = STOI[BOS_CHAR], STOI[PAD_CHAR], STOI[END_MARK]
OP_ADD, OP_SUB, OP_MUL = 0, 1, 2


@dataclass(frozen=True)
class TaskConfig:
    """The arithmetic task and its noisy supervision.

    Attributes:
        num_ops: K, operations per problem (3: prompt 9 tokens incl. BOS, response 8 tokens).
        p_sys: probability that a '*' step of an SFT trace uses the wrong rule (x + a) mod 10
            (0.5 = main setting, the wrong rule is the per-step mode; 0.4 = variation).
        eps: probability that a step not hit by the systematic error is a uniform random digit.
        mul_eps: extra probability that a '*' step not hit by the systematic error is (again) a
            uniform random digit (see the module docstring; 0 = the plain reading of the recipe).
        modulus: values are taken mod this (10: every value is one digit token).
    """

    num_ops: int = 3
    p_sys: float = 0.5
    eps: float = 0.1
    mul_eps: float = 0.1
    modulus: int = 10

    @property
    def prompt_len(self) -> int:
        """Prompt tokens: BOS, x0, K (operator, operand) pairs, '='."""
        return 3 + 2 * self.num_ops

    @property
    def response_len(self) -> int:
        """Tokens of a well-formed response: K values, K-1 commas, '#', answer, '$'."""
        return 2 * self.num_ops + 2


@dataclass
class Problems:
    """A batch of N problems (all int64 tensors on the CPU).

    Attributes:
        x0: [N] start digits.
        ops: [N, K] operator codes (0 '+', 1 '-', 2 '*').
        operands: [N, K] operand digits.
    """

    x0: Tensor
    ops: Tensor
    operands: Tensor

    def __len__(self) -> int:
        return int(self.x0.shape[0])

    def index(self, idx: Tensor) -> "Problems":
        """The sub-batch at ``idx`` (int64 [M] or bool [N])."""
        return Problems(self.x0[idx], self.ops[idx], self.operands[idx])

    @property
    def has_mul(self) -> Tensor:
        """bool [N]: the problem contains at least one '*'."""
        return (self.ops == OP_MUL).any(dim=1)


def sample_problems(n: int, cfg: TaskConfig, gen: torch.Generator) -> Problems:
    """Draw ``n`` problems uniformly (start digit, operators, operands independent and uniform)."""
    m, k = cfg.modulus, cfg.num_ops
    return Problems(torch.randint(0, m, (n,), generator=gen),
                    torch.randint(0, len(OPERATORS), (n, k), generator=gen),
                    torch.randint(0, m, (n, k), generator=gen))


def sample_distinct_problems(n: int, cfg: TaskConfig, gen: torch.Generator) -> Problems:
    """Like :func:`sample_problems`, but no problem appears twice in the batch (a repeated row is
    redrawn), so the prompt text can serve as the label store's uid within one step."""
    pr = sample_problems(n, cfg, gen)
    while True:
        keys = (pr.x0 * 10 ** (2 * cfg.num_ops)).clone()
        for j in range(cfg.num_ops):
            keys += (pr.ops[:, j] * cfg.modulus + pr.operands[:, j]) * (10 ** (2 * (cfg.num_ops - 1 - j)))
        first = torch.zeros(n, dtype=torch.bool)
        seen: set[int] = set()
        for i, k in enumerate(keys.tolist()):
            first[i] = k not in seen
            seen.add(k)
        if bool(first.all()):
            return pr
        dup = (~first).nonzero().flatten()
        fresh = sample_problems(len(dup), cfg, gen)
        pr.x0[dup], pr.ops[dup], pr.operands[dup] = fresh.x0, fresh.ops, fresh.operands


def _apply(x: Tensor, op: Tensor, a: Tensor, modulus: int) -> Tensor:
    out = torch.where(op == OP_ADD, x + a, torch.where(op == OP_SUB, x - a, x * a))
    return torch.remainder(out, modulus)


def true_trace(problems: Problems, cfg: TaskConfig) -> Tensor:
    """int64 [N, K]: the correct intermediate values; column -1 is the true answer."""
    x, values = problems.x0, []
    for j in range(cfg.num_ops):
        x = _apply(x, problems.ops[:, j], problems.operands[:, j], cfg.modulus)
        values.append(x)
    return torch.stack(values, dim=1)


def true_answers(problems: Problems, cfg: TaskConfig) -> Tensor:
    """int64 [N]: the correct final answer digit of each problem."""
    return true_trace(problems, cfg)[:, -1]


def noisy_trace(problems: Problems, cfg: TaskConfig, gen: torch.Generator) -> Tensor:
    """int64 [N, K]: an SFT trace drawn from the noise model of the module docstring.

    Each step starts from the previous *written* value, so an error propagates as a consistent
    line of reasoning and the answer (column -1) always equals the last written value.
    """
    n, m = len(problems), cfg.modulus
    x, values = problems.x0, []
    for j in range(cfg.num_ops):
        op, a = problems.ops[:, j], problems.operands[:, j]
        correct = _apply(x, op, a, m)
        wrong_rule = torch.remainder(x + a, m)
        is_mul = op == OP_MUL
        sys_hit = is_mul & (torch.rand(n, generator=gen) < cfg.p_sys)
        noisy = torch.where(torch.rand(n, generator=gen) < cfg.eps,
                            torch.randint(0, m, (n,), generator=gen), correct)
        noisy = torch.where(is_mul & (torch.rand(n, generator=gen) < cfg.mul_eps),
                            torch.randint(0, m, (n,), generator=gen), noisy)
        x = torch.where(sys_hit, wrong_rule, noisy)
        values.append(x)
    return torch.stack(values, dim=1)


def encode_prompts(problems: Problems, cfg: TaskConfig) -> Tensor:
    """int64 [N, 3 + 2K]: BOS, x0, (operator, operand) * K, '='."""
    n = len(problems)
    cols = [torch.full((n,), BOS), problems.x0]
    for j in range(cfg.num_ops):
        cols += [problems.ops[:, j] + STOI["+"], problems.operands[:, j]]
    cols.append(torch.full((n,), STOI[EQUALS]))
    return torch.stack(cols, dim=1)


def encode_responses(values: Tensor) -> Tensor:
    """int64 [N, 2K + 2] from values int64 [N, K]: "v1,v2,...,vK#vK$" (digits map to themselves)."""
    n, k = values.shape
    cols = []
    for j in range(k):
        cols.append(values[:, j])
        cols.append(torch.full((n,), STOI[COMMA] if j < k - 1 else STOI[ANSWER_MARK]))
    cols += [values[:, -1], torch.full((n,), END)]
    return torch.stack(cols, dim=1)


def sft_batch(n: int, cfg: TaskConfig, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """A fresh noisy SFT batch.

    Returns:
        tokens: int64 [n, prompt_len + response_len], prompt then noisy response.
        loss_mask: bool [n, prompt_len + response_len - 1], True where the next-token target is a
            response token (the loss is on response tokens only, end mark included).
    """
    problems = sample_problems(n, cfg, gen)
    tokens = torch.cat([encode_prompts(problems, cfg),
                        encode_responses(noisy_trace(problems, cfg, gen))], dim=1)
    loss_mask = torch.zeros(n, tokens.shape[1] - 1, dtype=torch.bool)
    loss_mask[:, cfg.prompt_len - 1:] = True
    return tokens, loss_mask


def decode(tokens: Tensor) -> str:
    """Text of a 1-D int64 token row, BOS and PAD removed."""
    return "".join(VOCAB[t] for t in tokens.tolist() if t != BOS and t != PAD)


def decode_responses(tokens: Tensor, lengths: Tensor) -> list[str]:
    """Texts of response rows: tokens int64 [N, T], lengths int64 [N] (tokens kept per row).

    A well-formed response reads "v1,...,vK#a$"; the answer is the digit between '#' and '$'.
    """
    return [decode(row[:int(n)]) for row, n in zip(tokens, lengths)]


def format_prompt(problems: Problems, cfg: TaskConfig) -> list[str]:
    """Prompt texts without BOS, e.g. "7*3+5-8="."""
    return [decode(row) for row in encode_prompts(problems, cfg)]
