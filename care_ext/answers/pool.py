"""A small process pool with a hard per-job deadline, for the symbolic step.

Why not ``concurrent.futures.ProcessPoolExecutor``: a job stuck in C code (a huge integer power
inside sympy) cannot be interrupted by a signal, and killing one executor worker breaks the whole
executor. Here each worker has its own pipe; a job that overruns ``job_timeout_s`` gets its worker
killed (by its pid, a process this pool started) and replaced, and that job alone reports
failure. Workers run each job on their own main thread, so signal-based time limits
(:mod:`care_ext.answers.timelimit`) work inside them whatever thread the caller is on.

Worker start method: ``"forkserver"`` by default (a clean server process, safe when the caller
has CUDA or many threads); ``"spawn"`` and ``"fork"`` are accepted.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

__all__ = ["WorkerPool", "JobFailed"]


class JobFailed:
    """Result placeholder for a job that timed out or whose worker died or raised."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"JobFailed({self.reason!r})"


#: the message a worker sends once its warm-up is done
_READY = ("ready", None)


def _worker_main(conn: Connection, warm_up: Callable[[], None] | None) -> None:
    try:
        if warm_up is not None:
            warm_up()
    except Exception:  # noqa: BLE001 - a failed warm-up must not kill the worker
        pass
    try:
        conn.send(_READY)  # the parent starts the first job's clock now
    except (EOFError, OSError):
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if msg is None:
            return
        fn, arg = msg
        try:
            out = ("ok", fn(arg))
        except BaseException as e:  # noqa: BLE001 - report, keep serving
            out = ("err", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
        try:
            conn.send(out)
        except Exception as e:  # noqa: BLE001 - e.g. unpicklable result
            conn.send(("err", f"cannot send result: {e}"))


def _noop(_: object) -> None:
    return None


class _Worker:
    __slots__ = ("proc", "conn", "busy", "ready")

    def __init__(self, ctx, warm_up):
        self.busy = False  #: a job was sent and its result not yet received
        self.ready = False  #: the worker has reported the end of its warm-up
        parent, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, warm_up), daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent

    def kill(self) -> None:
        try:
            self.proc.kill()
        except Exception:  # noqa: BLE001
            pass
        self.proc.join(timeout=5)
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except Exception:  # noqa: BLE001
            pass
        self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.kill()
        else:
            self.conn.close()


class WorkerPool:
    """``n_workers`` long-lived processes running module-level functions with a deadline.

    Args:
        n_workers: number of worker processes (>= 1). Started lazily on the first :meth:`map`.
        job_timeout_s: hard wall-clock limit of one job, measured from when it is sent to a
            worker, or from the end of the worker's warm-up if that is later; past it the worker
            is killed and replaced and the job returns :class:`JobFailed`.
        mp_context: multiprocessing start method ("forkserver", "spawn" or "fork").
        warm_up: optional picklable module-level callable each worker runs once at start
            (e.g. import math-verify), not counted against any job.
        warm_up_timeout_s: hard limit of a worker's warm-up (default 120 s); a job waiting on a
            warm-up that overruns it fails like a timed-out job.

    Thread-safe: concurrent :meth:`map` calls are serialised.
    """

    def __init__(
        self,
        n_workers: int,
        job_timeout_s: float = 30.0,
        mp_context: str = "forkserver",
        warm_up: Callable[[], None] | None = None,
        warm_up_timeout_s: float = 120.0,
    ):
        if n_workers < 1:
            raise ValueError("n_workers must be >= 1")
        self.n_workers = n_workers
        self.job_timeout_s = job_timeout_s
        self._ctx = mp.get_context(mp_context)
        self._warm_up = warm_up
        self.warm_up_timeout_s = warm_up_timeout_s
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.killed = 0  #: workers killed for overrunning a deadline (monitoring)

    def _ensure(self) -> None:
        if self._pid != os.getpid():  # used after a fork: the old workers belong to the parent
            self._workers = []
            self._pid = os.getpid()
        for w in [w for w in self._workers if w.busy]:  # left running by an interrupted map
            w.kill()  # its pending result must not be read as the answer to a later job
            self._workers.remove(w)
        self._workers = [w for w in self._workers if w.proc.is_alive()]
        while len(self._workers) < self.n_workers:
            self._workers.append(_Worker(self._ctx, self._warm_up))

    def map(self, fn: Callable[[Any], Any], args: Sequence[Any]) -> list[Any]:
        """Run ``fn(arg)`` for each arg in the workers; results in input order.

        A result is :class:`JobFailed` when the job overran ``job_timeout_s``, raised, or its
        worker died. Never raises for a job's failure. A call interrupted by an exception (a
        signal handler's, KeyboardInterrupt) leaves its running workers to be killed and replaced
        by the next call, so that no later job receives an earlier job's result.
        """
        if not args:
            return []
        with self._lock:
            self._ensure()
            results: list[Any] = [None] * len(args)
            pending = list(range(len(args)))[::-1]
            busy: dict[Connection, tuple[_Worker, int, float]] = {}
            idle = list(self._workers)
            while pending or busy:
                while pending and idle:
                    w = idle.pop()
                    i = pending.pop()
                    try:
                        w.busy = True
                        w.conn.send((fn, args[i]))
                    except Exception as e:  # noqa: BLE001 - dead pipe or unpicklable job
                        results[i] = JobFailed(f"send failed: {e}")
                        idle.append(self._replace(w))
                        continue
                    warm_up_left = 0.0 if w.ready else self.warm_up_timeout_s
                    busy[w.conn] = (w, i, time.monotonic() + warm_up_left + self.job_timeout_s)
                if not busy:
                    continue
                now = time.monotonic()
                next_deadline = min(d for _, _, d in busy.values())
                ready = wait(list(busy), timeout=max(0.0, next_deadline - now))
                for conn in ready:
                    w, i, _ = busy.pop(conn)
                    try:
                        status, payload = conn.recv()
                    except Exception:  # noqa: BLE001 - worker died (EOF) or garbage
                        results[i] = JobFailed("worker died")
                        idle.append(self._replace(w))
                        continue
                    if status == _READY[0]:  # warm-up over: the job's clock starts now
                        w.ready = True
                        busy[conn] = (w, i, time.monotonic() + self.job_timeout_s)
                        continue
                    w.busy = False
                    results[i] = payload if status == "ok" else JobFailed(payload)
                    idle.append(w)
                now = time.monotonic()
                for conn in [c for c, (_, _, d) in busy.items() if d <= now]:
                    w, i, _ = busy.pop(conn)
                    results[i] = JobFailed(f"timed out after {self.job_timeout_s} s")
                    self.killed += 1
                    idle.append(self._replace(w))
            return results

    def start(self) -> None:
        """Start every worker now and return once each has finished its warm-up."""
        self.map(_noop, [None] * self.n_workers)

    def _replace(self, w: _Worker) -> _Worker:
        w.kill()
        if w in self._workers:
            self._workers.remove(w)
        nw = _Worker(self._ctx, self._warm_up)
        self._workers.append(nw)
        return nw

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        with self._lock:
            if self._pid == os.getpid():
                for w in self._workers:
                    w.stop()
            self._workers = []

    def __del__(self):  # best effort; workers are daemons anyway
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
