"""A float-seconds time limit for pure-Python work on a process's main thread.

math-verify's own timeouts use ``signal.alarm`` (whole seconds, main thread only). The worker
processes of :mod:`care_ext.answers.pool` run every symbolic check on their main thread under this
limit instead; the parent additionally kills a worker that overruns its hard deadline (work stuck
inside C code, where no signal handler runs).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

__all__ = ["SymbolicTimeout", "time_limit", "can_time_limit"]


class SymbolicTimeout(BaseException):
    """Raised inside a :func:`time_limit` block when the limit expires.

    Derives from ``BaseException`` on purpose, so that the ``except Exception`` clauses inside
    math-verify and sympy cannot swallow it and keep working past the limit.
    """


def can_time_limit() -> bool:
    """True when :func:`time_limit` can interrupt work here (POSIX and the main thread)."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`SymbolicTimeout` in the block after ``seconds`` of wall time.

    ``None`` or ``<= 0`` means no limit. Must run on the main thread of its process (check with
    :func:`can_time_limit`); raises ``RuntimeError`` otherwise instead of silently not limiting.
    Once expired, it raises again every 0.1 s (at most ``seconds``) until the block exits, so a
    swallowed first raise does not lift the limit. A real-time timer the caller had armed (its
    own ``signal.alarm``/``setitimer`` timeout) is suspended inside the block and re-armed on exit
    with its remaining time (at once if that ran out meanwhile), together with its handler. An
    expiry that a finalizer drops inside the block does not reach ``sys.unraisablehook`` (other
    unraisable exceptions do).
    """
    if seconds is None or seconds <= 0:
        yield
        return
    if not can_time_limit():
        raise RuntimeError("time_limit needs the main thread of a POSIX process")

    def _fire(signum, frame):  # noqa: ARG001
        raise SymbolicTimeout(f"symbolic check exceeded {seconds} s")

    def _quiet(unraisable):  # a finalizer dropped an expiry: expected, the repeat raises again
        if not isinstance(unraisable.exc_value, SymbolicTimeout):
            outer_hook(unraisable)

    # Inside the block an expiry dropped by a finalizer reaches sys.unraisablehook ("Exception
    # ignored in ..."). It is part of the design (the repeat below), so it is not reported; under
    # pytest, whose hook records such exceptions and fails the test, a CI run failed on it once
    # (the repeat then fired inside pytest's hook as it formatted the first one).
    outer_hook = sys.unraisablehook
    sys.unraisablehook = _quiet
    old = signal.signal(signal.SIGALRM, _fire)
    # After the first expiry the timer fires again every `interval`: an exception raised while the
    # interpreter runs a finalizer (__del__, a weakref callback) is printed and dropped ("Exception
    # ignored in ..."), and code that catches BaseException drops it too; with a one-shot timer
    # the block would then run unbounded (a CI run hung > 20 min in a sympy simplify inside a 1 s
    # limit; a dropped first raise is the one way found for that to happen).
    repeat = min(max(seconds, 0.01), 0.1)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds, repeat)
    started = time.monotonic()
    try:
        yield
    finally:
        while True:  # a last expiry may land here, before the timer is off: disarm regardless
            try:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
                break
            except SymbolicTimeout:
                continue
        sys.unraisablehook = outer_hook
        if outer_delay > 0:  # the caller's timer: re-arm what was left of it
            remaining = outer_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-6), outer_interval)
