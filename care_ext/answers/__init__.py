"""care_ext.answers: responses -> integer answer ids (the input of the vote/CAG ops).

Public API
----------
``answer_ids(responses, task, gold=None, *, contexts=None, clusterer=None) -> (ids, gold_ids)``
    ``responses``: B groups of G response strings (``list[list[str]]``, rectangular).
    ``task``: "math", "kk", "arith" or any name added with :func:`register_task`.
    ``gold``: optional length-B list of gold labels (entries may be None).
    ``contexts``: length-B list of per-prompt contexts; required for "kk" (the puzzle text, its
    ``names`` list, or a record with ``names``/``quiz``); names are never read from the gold.
    Returns ``ids``: ``torch.int64 [B, G]``, cluster id of each response within its group
    (0, 1, ... in order of cluster size, ties by representative key; -1 = no extractable answer)
    and ``gold_ids``: ``torch.int64 [B]``, the id of the cluster equal to the gold (-1 if no
    response matches it or gold is None). Ids are local to a row.

``AnswerClusterer(workers, job_timeout_s, group_budget_s, verdict_cache_size, mp_context)``
    Callable like ``answer_ids``; owns the verdict cache shared across steps and the worker
    processes. ``answer_ids`` uses one process-wide instance unless ``clusterer=`` is given.

Tasks
-----
* math: the last brace-matched ``\\boxed{}``/``\\fbox{}``; no box = invalid. Canonical key first
  (whitespace and LaTeX noise removed, ``\\dfrac``->``\\frac``, ``\\text{}`` unwrapped; integers by
  value on the digit string so "025" = "25"; decimals and integer fractions as exact reduced
  rationals, so "0.5" = "1/2" = "\\frac{1}{2}"). Distinct keys are then compared with math-verify
  (each parsed as ``\\boxed{key}``; equal only if ``verify`` holds in both directions), except
  two exact numbers, which are equal only if their values are (stricter than math-verify for a
  rounded decimal: "0.333333" is not "1/3"), and two constants whose values (a small strict
  evaluator of ``\\frac``/``\\sqrt``/``\\pi``/arithmetic) differ by more than a relative 1e-4,
  which are unequal without a math-verify call. Word answers ("none", "\\text{Evelyn}") match
  only the same words, case-insensitive. Answers longer than 200 characters or holding a numeric
  power tower are exact-match only.
* kk: the last ``<answer>...</answer>``; every puzzle name must get exactly one role
  ("X is a knight", "X: knave", "x=knight"); key ``"a=knave|b=knight|..."`` (lower-case, sorted).
* arith: the CPU miniature's digits between the last ``#`` and the first end mark ``$``;
  integer value.

Clustering rule (equivalence is not transitive)
-----------------------------------------------
Responses with identical keys form *key classes*, ordered by (size desc, key text asc). Walking
that order, a class joins the first cluster (creation order) whose representative - its first,
largest class - is equivalent to it, unless the class is an exact number and the cluster already
holds one; otherwise it founds a new cluster. The gold is placed the same way as one more class
arriving last, without changing the response clusters. Nothing depends on the order of the G
responses, and a cluster never holds two distinct numbers. See :mod:`care_ext.answers.cluster`.

Speed and robustness
--------------------
Extraction and keys run in the caller (pure Python, microseconds). Pair verdicts are cached
across calls (``verdict_cache_size``); a group whose comparisons are all cached or trivially
decided never leaves the caller. The others go to worker processes (``workers``, default
min(8, CPUs)), each check under a 1 s limit (``MathVerifyEquivalence.parse_timeout_s`` /
``verify_timeout_s``; signal timers on the worker's main thread, so they work whatever thread
calls), each group under a soft ``group_budget_s`` (5 s) and a hard ``job_timeout_s`` (20 s),
past which the worker is killed and replaced and the group keeps its key classes. Timed-out or
unparsable answers end up as their own cluster; non-text responses (None, undecodable bytes)
are invalid.

Adding a task: ``register_task(AnswerTask(name, extract, key, gold_key, equivalence=None))``.

Runtime requirements: ``math-verify[antlr4_13_2]==0.9.0`` (brings sympy 1.14.0,
latex2sympy2_extended 1.11.0, antlr4-python3-runtime 4.13.2) and torch (for the returned
tensors only; worker processes never import it). Worker processes use the "forkserver" start
method, so a script that calls this must guard its entry point with ``if __name__ == "__main__"``.
"""

from __future__ import annotations

from typing import Any, Sequence

from .clusterer import AnswerClusterer, default_clusterer
from .keys import CanonicalKey
from .registry import AnswerTask, get_task, register_task, registered_tasks

__all__ = [
    "answer_ids",
    "AnswerClusterer",
    "AnswerTask",
    "CanonicalKey",
    "register_task",
    "get_task",
    "registered_tasks",
]


def answer_ids(
    responses: Sequence[Sequence[Any]],
    task: str,
    gold: Sequence[Any] | None = None,
    *,
    contexts: Sequence[Any] | None = None,
    clusterer: AnswerClusterer | None = None,
):
    """Cluster each group's responses into integer answer ids.

    Args:
        responses: B groups of G responses (str; bytes are decoded, other types are invalid).
        task: registered task name ("math", "kk", "arith", ...).
        gold: optional length-B gold labels (None entries allowed) mapped into the same id space.
        contexts: optional length-B per-prompt contexts (required by "kk": puzzle text or names).
        clusterer: the :class:`AnswerClusterer` to use (default: the process-wide one).

    Returns:
        ``(ids, gold_ids)``: ``torch.int64`` tensors of shape ``[B, G]`` and ``[B]``; -1 marks a
        response without an extractable answer, or a gold that matches no response (or no gold).

    Raises:
        KeyError: unknown task. ValueError: responses not a list of groups (e.g. a flat list of
        strings), ragged responses, wrong lengths, missing contexts.
    """
    c = clusterer if clusterer is not None else default_clusterer()
    return c(responses, task, gold, contexts=contexts)
