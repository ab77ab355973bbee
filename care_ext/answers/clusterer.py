""":class:`AnswerClusterer`: responses -> integer answer ids, with a cross-step cache and workers."""

from __future__ import annotations

import atexit
import os
import threading
from collections import OrderedDict
from typing import Any, Sequence

from . import tasks as _tasks  # noqa: F401 - registers the built-in tasks
from .cluster import KeyClass, assign_gold, cluster_ids, comparable, group_key_classes, merge_key_classes
from .extract import as_text
from .keys import CanonicalKey
from .pool import JobFailed, WorkerPool
from .registry import AnswerTask, get_task
from .symbolic_job import SymbolicJob, SymbolicResult, pair_key, run_symbolic_job, warm_up_math
from .timelimit import can_time_limit

__all__ = ["AnswerClusterer", "GroupKeys"]

#: default number of worker processes: the CPUs, at most 8
DEFAULT_WORKERS = max(1, min(8, os.cpu_count() or 1))


class _Miss(Exception):
    pass


class GroupKeys:
    """Keys of one group: ``keys[i]`` (None = invalid), the key classes and the gold key."""

    __slots__ = ("keys", "classes", "gold")

    def __init__(self, keys: list[CanonicalKey | None], gold: CanonicalKey | None):
        self.keys = keys
        self.classes: list[KeyClass] = group_key_classes(keys)
        self.gold = gold


class AnswerClusterer:
    """Turns groups of responses into answer ids; holds the verdict cache and the worker pool.

    Args:
        workers: worker processes for the symbolic step (default :data:`DEFAULT_WORKERS`). ``0``
            runs the symbolic step in the calling process; that is only time-limited on a main
            thread, so off the main thread a 1-worker pool is used instead.
        job_timeout_s: hard wall-time limit per group's symbolic job (default 20 s); past it the
            worker is killed and the group falls back to its string-key classes (plus cached
            verdicts).
        group_budget_s: soft budget per group inside the worker (default 5 s); once spent, the
            remaining comparisons of that group count as unequal.
        verdict_cache_size: pair verdicts kept across calls (LRU, default 1,000,000 pairs).
        mp_context: start method of the worker processes (default "forkserver").

    The per-check limits of math (parse and verify, 1 s each) are fields of the task's
    equivalence (:class:`care_ext.answers.math_equiv.MathVerifyEquivalence`).
    """

    def __init__(
        self,
        workers: int | None = None,
        job_timeout_s: float = 20.0,
        group_budget_s: float = 5.0,
        verdict_cache_size: int = 1_000_000,
        mp_context: str = "forkserver",
    ):
        self.workers = DEFAULT_WORKERS if workers is None else int(workers)
        if self.workers < 0:
            raise ValueError("workers must be >= 0")
        self.job_timeout_s = float(job_timeout_s)
        self.group_budget_s = float(group_budget_s)
        self.verdict_cache_size = int(verdict_cache_size)
        self.mp_context = mp_context
        self._cache: OrderedDict[tuple[str, str, str], bool] = OrderedDict()
        self._pool: WorkerPool | None = None
        self._lock = threading.Lock()
        self.stats = {"groups": 0, "symbolic_jobs": 0, "failed_jobs": 0, "cache_hits": 0}

    # ------------------------------------------------------------------ keys
    @staticmethod
    def group_keys(task: AnswerTask, group: Sequence[Any], gold: Any = None, context: Any = None) -> GroupKeys:
        """Extract and key the responses of one group (pure Python, in the calling process).

        A response that is not text, or whose extraction/keying raises, is invalid (None).
        ``task.prepare_context`` errors (an unusable puzzle) propagate.
        """
        if task.needs_context and context is None:
            raise ValueError(f"task {task.name!r} needs a context for every group")
        if task.prepare_context is not None and context is not None:
            context = task.prepare_context(context)
        keys: list[CanonicalKey | None] = []
        for r in group:
            text = as_text(r)
            k = None
            if text is not None:
                try:
                    raw = task.extract(text, context)
                    k = task.key(raw, context) if raw is not None else None
                except Exception:  # noqa: BLE001 - a malformed answer is invalid, never fatal
                    k = None
            keys.append(k)
        g = task.gold_key(gold, context) if gold is not None else None
        return GroupKeys(keys, g)

    # ------------------------------------------------------------- clustering
    def _cached_equal(self, task_name: str):
        cache = self._cache

        def equal(a: CanonicalKey, b: CanonicalKey) -> bool:
            pk = (task_name,) + pair_key(a, b)
            v = cache.get(pk)
            if v is None:
                raise _Miss
            self.stats["cache_hits"] += 1
            return v

        return equal

    def _store(self, task_name: str, verdicts: dict[tuple[str, str], bool]) -> None:
        cache = self._cache
        for pk, v in verdicts.items():
            cache[(task_name,) + pk] = v
        while len(cache) > self.verdict_cache_size:
            cache.popitem(last=False)

    def _known(self, task_name: str, gk: GroupKeys) -> dict[tuple[str, str], bool]:
        keys = [c.key for c in gk.classes] + ([gk.gold] if gk.gold is not None else [])
        out = {}
        for i in range(len(keys)):
            for j in range(i + 1, len(keys)):
                if comparable(keys[i], keys[j]):
                    pk = pair_key(keys[i], keys[j])
                    v = self._cache.get((task_name,) + pk)
                    if v is not None:
                        out[pk] = v
        return out

    def _get_pool(self) -> WorkerPool:
        if self._pool is None:
            self._pool = WorkerPool(
                max(1, self.workers), job_timeout_s=self.job_timeout_s, mp_context=self.mp_context,
                warm_up=warm_up_math,
            )
        return self._pool

    def start(self) -> None:
        """Start the worker processes now and wait until all are warm (optional: otherwise they
        start on the first group that needs a symbolic check). No-op with ``workers=0``."""
        if self.workers > 0:
            self._get_pool().start()

    def _run_jobs(self, jobs: list[SymbolicJob]) -> list[SymbolicResult | JobFailed]:
        if not jobs:
            return []
        if self.workers == 0 and can_time_limit():
            return [run_symbolic_job(j) for j in jobs]
        return self._get_pool().map(run_symbolic_job, jobs)

    def cluster_groups(self, task: AnswerTask, groups: Sequence[GroupKeys]) -> list[tuple[list[int], int]]:
        """Apply the clustering rule to keyed groups: per group (ids, gold_id)."""
        out: list[tuple[list[int], int] | None] = [None] * len(groups)
        equal = self._cached_equal(task.name)
        todo: list[int] = []
        with self._lock:
            for b, gk in enumerate(groups):
                try:
                    clusters = merge_key_classes(gk.classes, equal)
                    gc = assign_gold(gk.classes, clusters, gk.gold, equal)
                except _Miss:
                    todo.append(b)
                    continue
                out[b] = cluster_ids(len(gk.keys), gk.classes, clusters, gc)
            jobs = []
            for b in todo:
                gk = groups[b]
                slim = [KeyClass(c.key, ()) for c in gk.classes]
                jobs.append(SymbolicJob(task.equivalence, slim, gk.gold, self._known(task.name, gk), self.group_budget_s))
            self.stats["groups"] += len(groups)
            self.stats["symbolic_jobs"] += len(jobs)
        results = self._run_jobs(jobs)
        with self._lock:
            for b, res in zip(todo, results):
                gk = groups[b]
                if isinstance(res, JobFailed):
                    self.stats["failed_jobs"] += 1
                    known = self._known(task.name, gk)

                    def fallback(a, c, known=known):
                        return known.get(pair_key(a, c), False)

                    clusters = merge_key_classes(gk.classes, fallback)
                    gc = assign_gold(gk.classes, clusters, gk.gold, fallback)
                else:
                    self._store(task.name, res.verdicts)
                    clusters, gc = res.clusters, res.gold_cluster
                out[b] = cluster_ids(len(gk.keys), gk.classes, clusters, gc)
        return out  # type: ignore[return-value]

    def __call__(
        self,
        responses: Sequence[Sequence[Any]],
        task: str,
        gold: Sequence[Any] | None = None,
        *,
        contexts: Sequence[Any] | None = None,
    ):
        """See :func:`care_ext.answers.answer_ids` (same arguments and results)."""
        import torch  # lazy: workers and key-only users never pay for it

        spec = get_task(task)
        if isinstance(responses, (str, bytes, bytearray)) or any(
            isinstance(r, (str, bytes, bytearray)) for r in responses
        ):
            # a flat list of B*G strings would otherwise be read as groups of characters
            raise ValueError(
                "responses must be B groups (lists) of G responses, not a flat list of strings"
            )
        B = len(responses)
        G = len(responses[0]) if B else 0
        if any(len(r) != G for r in responses):
            raise ValueError("responses must be rectangular: every group needs the same G")
        if any(isinstance(x, (str, bytes, bytearray)) for x in (gold, contexts)):
            raise ValueError("gold and contexts must be length-B lists (one entry per group)")
        if gold is not None and len(gold) != B:
            raise ValueError(f"gold has {len(gold)} entries for {B} groups")
        if contexts is not None and len(contexts) != B:
            raise ValueError(f"contexts has {len(contexts)} entries for {B} groups")
        if spec.needs_context and contexts is None:
            raise ValueError(f"task {task!r} needs contexts= (per prompt: the puzzle text or its names)")
        groups = [
            self.group_keys(
                spec, responses[b], None if gold is None else gold[b], None if contexts is None else contexts[b]
            )
            for b in range(B)
        ]
        res = self.cluster_groups(spec, groups)
        ids = torch.tensor([r[0] for r in res], dtype=torch.int64).reshape(B, G)
        gold_ids = torch.tensor([r[1] for r in res], dtype=torch.int64).reshape(B)
        return ids, gold_ids

    def close(self) -> None:
        """Stop the worker processes (the cache is kept; a later call restarts workers)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def clear_cache(self) -> None:
        """Forget every cached verdict."""
        with self._lock:
            self._cache.clear()


_DEFAULT: AnswerClusterer | None = None
_DEFAULT_LOCK = threading.Lock()


def default_clusterer() -> AnswerClusterer:
    """The process-wide clusterer used by :func:`care_ext.answers.answer_ids` (created lazily)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = AnswerClusterer()
            atexit.register(_DEFAULT.close)
        return _DEFAULT
