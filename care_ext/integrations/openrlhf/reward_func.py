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
without a gold answer, or any error, scores 0.

Use: ``--reward.remote_url $(python -c "import care_ext.integrations.openrlhf.reward_func as m; print(m.__file__)")``.
"""
from __future__ import annotations

import torch

from care_ext.answers import get_task

# Absolute imports only: OpenRLHF loads this file as a top-level module named "reward_func"
# (importlib.util.spec_from_file_location in openrlhf/utils/agent.py), so it has no package.
from care_ext.integrations.openrlhf.labels import parse_label


def grade(response: str, label, prompt: str = "") -> float:
    """1.0 when ``response``'s answer has the gold's canonical key, else 0.0 (never raises)."""
    try:
        lab = parse_label(label, prompt)
        if lab.answer is None:
            return 0.0
        task = get_task(lab.task)
        ctx = lab.context()
        if task.prepare_context is not None and ctx is not None:
            ctx = task.prepare_context(ctx)
        raw = task.extract(response, ctx)
        if raw is None:
            return 0.0
        k, g = task.key(raw, ctx), task.gold_key(lab.answer, ctx)
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
