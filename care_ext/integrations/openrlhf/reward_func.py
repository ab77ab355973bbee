"""A ``--reward.remote_url`` reward function for the CARE label column; it never raises.

OpenRLHF 0.11.2 calls ``reward_func(queries, prompts, labels)`` inside every vLLM rollout actor,
one rollout at a time (lists of length 1). Under CARE the training reward is overwritten by the
trainer (pseudo-label or bought gold), so this function only:

* keeps ``rewards`` non-None (OpenRLHF otherwise looks for a reward model and fails),
* grades the response against the label's gold ``answer`` for logging (``info["care/reward_fn"]``,
  a simulation-only quantity) and for OpenRLHF's own eval pass@k.

Grading is canonical-key equality of the task's answer reader (:mod:`care_ext.answers`: last
``\\boxed{}`` for math, integers by value, fractions/decimals as exact rationals; K&K role
assignment), in-process with no math-verify call, so it is fast and safe in any process. A label
without a gold answer, or any error, scores 0. The reader is the label's ``task`` unless the job
forces one with ``--care.task`` (read from the job's :data:`~.config.ENV_VAR` options, which every
Ray actor of the job receives), as in the trainer.

Use: ``--reward.remote_url $(python -c "import care_ext.integrations.openrlhf.reward_func as m; print(m.__file__)")``.
"""
from __future__ import annotations

import functools
import json
import os

import torch

from care_ext.answers import get_task

# Absolute imports only: OpenRLHF loads this file as a top-level module named "reward_func"
# (importlib.util.spec_from_file_location in openrlhf/utils/agent.py), so it has no package.
from care_ext.integrations.openrlhf.config import ENV_VAR, TASKS
from care_ext.integrations.openrlhf.labels import parse_label


@functools.lru_cache(maxsize=8)
def _task_of(options_json: str | None) -> str:
    """``--care.task`` from the job's options JSON (:data:`ENV_VAR`); ``auto`` when unset."""
    if not options_json:
        return "auto"
    task = json.loads(options_json).get("task", "auto")
    if task not in TASKS:
        raise ValueError(f"--care.task must be one of {TASKS}, got {task!r}")
    return task


def care_task() -> str:
    """The answer reader every grade uses: the job's ``--care.task``, which the launcher puts in
    the environment of every Ray actor (:data:`ENV_VAR`, the vLLM engines included)."""
    return _task_of(os.environ.get(ENV_VAR))


def grade(response: str, label, prompt: str = "", task: str | None = None) -> float:
    """1.0 when ``response``'s answer has the gold's canonical key, else 0.0 (never raises).

    ``task``: ``auto`` / ``math`` / ``kk`` as ``--care.task``; None = the job's (:func:`care_task`).
    """
    try:
        lab = parse_label(label, prompt, task=care_task() if task is None else task)
        if lab.answer is None:
            return 0.0
        reader = get_task(lab.task)
        ctx = lab.context()
        if reader.prepare_context is not None and ctx is not None:
            ctx = reader.prepare_context(ctx)
        raw = reader.extract(response, ctx)
        if raw is None:
            return 0.0
        k, g = reader.key(raw, ctx), reader.gold_key(lab.answer, ctx)
        return float(k is not None and g is not None and k.text == g.text)
    except Exception:  # noqa: BLE001 - a reward function must never raise inside vLLM actors
        return 0.0


def reward_func(queries, prompts, labels, **kwargs):
    """OpenRLHF reward function: ``queries`` (prompt + response text), ``prompts``, ``labels``
    (lists of equal length) -> ``{"rewards": float32 [N], "scores": float32 [N], "extra_logs": {}}``."""
    out = []
    for q, p, lab in zip(queries, prompts, labels):
        resp = q[len(p):] if isinstance(q, str) and isinstance(p, str) and q.startswith(p) else q
        out.append(grade(resp if isinstance(resp, str) else "", lab, p if isinstance(p, str) else ""))
    r = torch.tensor(out, dtype=torch.float32)
    return {"rewards": r, "scores": r.clone(), "extra_logs": {}}
