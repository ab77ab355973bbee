"""The label column: how a prompt's uid, gold answer and task travel through OpenRLHF.

OpenRLHF hands the ``--data.label_key`` value of each prompt, unchanged, to the reward function
and to ``Experience.labels``. The recipes in ``training/openrlhf`` write it as a JSON string::

    {"uid": "dapo17k-00042", "answer": "34", "task": "math"}
    {"uid": "kk5-00117", "answer": "a=knave|b=knight|...", "task": "kk", "names": ["A", "B", ...]}

``uid`` is the label store's key (a prompt is paid once, ever); ``answer`` is the gold answer the
``gold`` oracle sells; ``task`` picks the answer reader; ``names`` are the K&K puzzle's names.
A label that is not a JSON object is taken as the bare gold answer, with the uid a hash of the
prompt text.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PromptLabel:
    """One prompt's parsed label: ``uid`` (str), ``answer`` (gold, may be None), ``task`` (str),
    ``names`` (K&K puzzle names or empty)."""

    uid: str
    answer: Any
    task: str
    names: tuple = field(default=())

    def context(self):
        """The per-prompt context :func:`care_ext.answers.answer_ids` needs (K&K: the names)."""
        return list(self.names) if self.names else None


def prompt_uid(prompt: str) -> str:
    """Stable uid of a prompt without one in its label: ``sha1:`` + 20 hex digits of the text."""
    return "sha1:" + hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:20]


def parse_label(label: Any, prompt: str, task: str = "auto") -> PromptLabel:
    """Parse a label-column value (JSON string, dict, or bare answer) of the prompt ``prompt``.

    Args:
        label: the ``Experience.labels`` entry.
        prompt: the templated prompt text (used for the fallback uid).
        task: ``auto`` (the label's ``task``, default ``math``) or a task forcing every prompt.
    """
    obj = label
    if isinstance(label, str):
        try:
            obj = json.loads(label)
        except ValueError:
            obj = label
    if isinstance(obj, dict):
        t = obj.get("task", "math") if task == "auto" else task
        uid = obj.get("uid")
        return PromptLabel(str(uid) if uid is not None else prompt_uid(prompt), obj.get("answer"), str(t),
                           tuple(obj.get("names") or ()))
    return PromptLabel(prompt_uid(prompt), obj if obj != "" else None, "math" if task == "auto" else task)


def make_label(uid: str, answer: Any, task: str, names: list[str] | None = None) -> str:
    """The JSON label string the recipes write (inverse of :func:`parse_label`)."""
    d = {"uid": uid, "answer": answer, "task": task}
    if names:
        d["names"] = list(names)
    return json.dumps(d, ensure_ascii=False, sort_keys=True)
