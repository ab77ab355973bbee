"""The worker pool and the signal time limit as seen by a caller with its own signals."""

import functools
import signal
import time

import pytest

from care_ext.answers.pool import JobFailed, WorkerPool
from care_ext.answers.timelimit import time_limit


class _Interrupted(Exception):
    pass


def _raise_interrupted(signum, frame):
    raise _Interrupted


def test_an_interrupted_map_does_not_leak_its_result_into_the_next():
    """A map cut short by the caller (its own alarm, KeyboardInterrupt) left the worker running
    the old job; the next map then read that job's result as its own answer."""
    pool = WorkerPool(1, job_timeout_s=30.0)
    old = signal.signal(signal.SIGALRM, _raise_interrupted)
    try:
        pool.start()
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(_Interrupted):
            pool.map(time.sleep, [1.5])  # result None, ready after 1.5 s
        assert pool.map(abs, [-3]) == [3]
        assert pool.map(abs, [-4]) == [4]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        pool.close()


def test_the_callers_timer_survives_a_time_limit():
    """time_limit used to switch off a real-time timer the caller had armed (the inline clusterer
    runs it on the caller's main thread), so the caller's own timeout never fired."""
    fired = []
    old = signal.signal(signal.SIGALRM, lambda s, f: fired.append(time.monotonic()))
    try:
        t0 = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with time_limit(5.0):
            pass
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0.2 < left <= 0.5
        deadline = time.monotonic() + 5
        while not fired and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(fired) == 1 and fired[0] - t0 < 2.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_callers_timer_that_came_due_inside_the_limit_fires_after_it():
    fired = []
    old = signal.signal(signal.SIGALRM, lambda s, f: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with time_limit(5.0):
            time.sleep(0.2)  # the caller's timer is due meanwhile; ours has not expired
        deadline = time.monotonic() + 2
        while not fired and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fired == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_the_warm_up_does_not_count_against_the_first_job():
    """The job clock started at send, while a fresh worker was still warming up: with a warm-up
    longer than job_timeout_s every job on a cold (or just replaced) worker timed out, the
    worker was replaced, and the next job met the same fate."""
    pool = WorkerPool(1, job_timeout_s=1.0, warm_up=functools.partial(time.sleep, 2.0))
    try:
        assert pool.map(abs, [-1]) == [1]
        assert pool.map(abs, [-2]) == [2] and pool.killed == 0
    finally:
        pool.close()


def test_a_hanging_warm_up_is_bounded():
    hang = functools.partial(time.sleep, 60.0)
    pool = WorkerPool(1, job_timeout_s=0.5, warm_up=hang, warm_up_timeout_s=1.0)
    try:
        t = time.monotonic()
        (res,) = pool.map(abs, [-1])
        assert isinstance(res, JobFailed) and time.monotonic() - t < 20
    finally:
        pool.close()
