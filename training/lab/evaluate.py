"""Held-out evaluation: greedy accuracy, mean@n, maj@n, format validity, split by contains-'*'."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from care_ext.answers import answer_ids as _answer_ids
from care_ext.ops import cluster_stats

from .model import TinyGPT
from .rollout import sample_responses
from .task import Problems, TaskConfig, decode_responses, encode_prompts, sample_problems, true_answers

AnswerIds = Callable[[list[list[str]], list[int]], tuple[Tensor, Tensor]]
"""(responses: B groups of G texts, gold: B ints) -> (ids int64 [B, G], gold_ids int64 [B])."""

ANSWER_TASK = "arith"
"""The care_ext.answers task that parses the lab's responses ("v1,...,vK#a$")."""


def arith_answer_ids(texts: list[list[str]], gold: list[int]) -> tuple[Tensor, Tensor]:
    """care_ext.answers on the lab's responses: (ids int64 [B, G] cluster ids local to each row,
    -1 = unparseable; gold_ids int64 [B], the id of the gold's cluster or -1 if no response has it)."""
    return _answer_ids(texts, ANSWER_TASK, gold)


@dataclass
class EvalSet:
    """A fixed held-out problem set.

    Attributes:
        problems: the N problems; prompts: int64 [N, Tp]; gold: int64 [N] true answers;
        has_mul: bool [N], problem contains a '*'.
    """

    problems: Problems
    prompts: Tensor
    gold: Tensor
    has_mul: Tensor


def make_eval_set(n: int, cfg: TaskConfig, seed: int) -> EvalSet:
    """``n`` problems drawn with a generator seeded by ``seed`` (same set for every run)."""
    problems = sample_problems(n, cfg, torch.Generator().manual_seed(seed))
    return EvalSet(problems, encode_prompts(problems, cfg), true_answers(problems, cfg),
                   problems.has_mul)


def correctness(texts: list[list[str]], gold: Tensor, answer_ids: AnswerIds) -> tuple[Tensor, Tensor]:
    """Which responses are right, via the answer-id mapping.

    Args:
        texts: N groups of G response texts; gold: int64 [N]; answer_ids: the mapping.

    Returns:
        (correct bool [N, G], ids int64 [N, G]); a response is correct when it has a valid id
        equal to the gold's id.
    """
    ids, gold_ids = answer_ids(texts, [int(x) for x in gold])
    return (ids >= 0) & (ids == gold_ids[:, None]), ids


@torch.no_grad()
def evaluate(model: TinyGPT, evalset: EvalSet, answer_ids: AnswerIds = arith_answer_ids,
             n_samples: int = 8,
             temperature: float = 1.0, max_new_tokens: int = 9, seed: int = 0) -> dict[str, float]:
    """Greedy, mean@n and maj@n accuracy on the held-out set, overall and split by contains-'*'.

    Args:
        n_samples: n, samples per problem for mean@n / maj@n (named "@8" in the output keys
            whatever n is, as in tiny_lab.md).
        temperature: sampling temperature of the n samples.
        seed: seed of the sampling generator (fixed so evaluations are comparable).

    Returns:
        dict with greedy, mean8, maj8, valid (fraction of sampled responses with an answer), and
        the same keys suffixed _mul / _nomul for the two subsets (NaN for an empty subset).
        maj@n is correct when the largest answer cluster (ties: earliest response) is the gold.
    """
    n = evalset.prompts.shape[0]
    greedy_tok, greedy_len = sample_responses(model, evalset.prompts, max_new_tokens, 0.0, None)
    g_texts = [[t] for t in decode_responses(greedy_tok, greedy_len)]
    greedy_ok, _ = correctness(g_texts, evalset.gold, answer_ids)
    gen = torch.Generator().manual_seed(seed)
    rep = evalset.prompts.repeat_interleave(n_samples, dim=0)
    s_tok, s_len = sample_responses(model, rep, max_new_tokens, temperature, gen)
    flat = decode_responses(s_tok, s_len)
    texts = [flat[i * n_samples:(i + 1) * n_samples] for i in range(n)]
    ok, ids = correctness(texts, evalset.gold, answer_ids)
    rank, _ = cluster_stats(ids)
    maj_ok = ((rank == 0) & ok).any(dim=1)
    per = {"greedy": greedy_ok[:, 0].float(), "mean8": ok.float().mean(1),
           "maj8": maj_ok.float(), "valid": (ids >= 0).float().mean(1)}
    out = {}
    for name, vals in per.items():
        out[name] = float(vals.mean())
        for suffix, sel in (("_mul", evalset.has_mul), ("_nomul", ~evalset.has_mul)):
            out[name + suffix] = float(vals[sel].mean()) if sel.any() else float("nan")
    return out
