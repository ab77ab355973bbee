"""An equivalence that ignores the soft time limit (SIGALRM blocked) and sleeps: it can only be
stopped by the pool's hard deadline. Imported by the worker processes by module name."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class BlockingEquivalence:
    sleep_s: float = 60.0

    def __call__(self, a: str, b: str) -> bool:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(self.sleep_s)
        return True
