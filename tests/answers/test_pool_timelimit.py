"""The worker pool and the signal time limit as seen by a caller with its own signals."""

import signal
import time

import pytest

from care_ext.answers.pool import WorkerPool


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
