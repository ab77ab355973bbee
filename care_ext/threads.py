"""The controller's CPU threads: what the library does about OpenMP's thread pools.

torch's CPU ops run their parallel regions on OpenMP (libgomp in torch's Linux wheels). Each host
thread that starts a parallel region gets a pool of workers of its own, kept docked between
regions. libgomp counts every docked worker of every thread against the cores; when they outnumber
the cores it lets workers spin only briefly before they sleep, so each parallel region then waits
for its workers to wake. A background update (``CareConfig.background_update``) is such a second
thread: on the 2-core VM of bench/RESULTS.md (fourteenth session) a classifier update took
108-113 ms on a new thread against 57-65 ms on the main one. Releasing the main thread's idle
pool first (:func:`release_idle_threads`) brought it to 67-82 ms.
"""
from __future__ import annotations

import torch


def release_idle_threads() -> bool:
    """End the calling thread's idle OpenMP workers (``omp_pause_resource_all(omp_pause_soft)``;
    its next parallel region starts new ones, ~0.1 ms once).

    Call it from a thread that is not inside a parallel region, before handing CPU work to
    another thread; other threads' pools are not touched.

    Returns:
        True where the runtime released them; False where nothing was done (no native library,
        a build without OpenMP, or a runtime that refused).
    """
    from .ops import native_available

    if not native_available("cpu"):
        return False
    return bool(torch.ops.care_ext._release_idle_threads())
