"""Task plug-ins: how a task extracts, keys and compares answers.

A new task plugs in with :func:`register_task`. Everything a worker process needs
(``equivalence``) must be picklable by reference (module-level functions or instances of
module-level classes), because custom registrations made in the caller are not visible inside
the worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .keys import CanonicalKey

__all__ = ["AnswerTask", "register_task", "get_task", "registered_tasks"]


@dataclass(frozen=True)
class AnswerTask:
    """One answer task.

    Attributes:
        name: registry name ("math", "kk", "arith", ...).
        extract: ``(response_text, context) -> str | None``: the raw final answer of a response,
            ``None`` when it has none.
        key: ``(raw_answer, context) -> CanonicalKey | None``: its canonical key (``None`` =
            invalid). Keys with ``symbolic=False`` only ever match identical keys.
        gold_key: ``(gold_label, context) -> CanonicalKey | None``: the gold label in the same key
            space (``None`` = the gold maps to no cluster).
        equivalence: ``(a_latex, b_latex) -> bool`` for two distinct symbolic keys (symmetric;
            run in worker processes), or ``None`` for tasks with exact keys only.
        needs_context: whether ``context`` (per prompt: e.g. the K&K puzzle or its names) is
            required.
        prepare_context: ``context -> context`` run once per group before the responses are
            keyed (e.g. reading the names out of a K&K puzzle); may raise ``ValueError`` for a
            context it cannot use, which is the caller's error and propagates.
    """

    name: str
    extract: Callable[[str, object], str | None]
    key: Callable[[str, object], CanonicalKey | None]
    gold_key: Callable[[object, object], CanonicalKey | None]
    equivalence: Callable[[str, str], bool] | None = None
    needs_context: bool = False
    prepare_context: Callable[[object], object] | None = None


_REGISTRY: dict[str, AnswerTask] = {}


def register_task(task: AnswerTask, *, replace: bool = False) -> None:
    """Register ``task`` under ``task.name``; ``replace=True`` to overwrite an existing one."""
    if task.name in _REGISTRY and not replace:
        raise ValueError(f"answer task {task.name!r} is already registered")
    _REGISTRY[task.name] = task


def get_task(name: str) -> AnswerTask:
    """The registered task called ``name`` (KeyError with the known names otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown answer task {name!r}; registered: {sorted(_REGISTRY)}") from None


def registered_tasks() -> list[str]:
    """Names of all registered tasks, sorted."""
    return sorted(_REGISTRY)
