"""A CARE run over 3 steps with a synchronous judge, used by the crash/resume test.

Modes: ``straight`` (no interruption), ``crash`` (step 0, checkpoint, then step 1 hangs inside the
judge's 3rd call after writing ``marker``; the test SIGKILLs the process there), ``resume`` (load
the checkpoint, redo step 1, then step 2). Each mode returns / writes the decisions it made.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from core_synth import make_batch, make_world  # noqa: E402

from care_ext.config import CareConfig  # noqa: E402
from care_ext.labels import CallableOracle  # noqa: E402
from care_ext.step import CareController  # noqa: E402

B, G, H = 20, 8, 16


def run(mode: str, store: str, ckpt: str, marker: str | None = None) -> dict:
    world = make_world(B=B, G=G, H=H, seed=3)
    batches = [make_batch(world, s, seed=3) for s in range(3)]
    gold = {u: g for b in batches for u, g in b.gold.items()}
    calls = {"n": 0}

    def judge(uid, payload):
        calls["n"] += 1
        if mode == "crash" and ctl.step == 1 and calls["n"] == 3:
            with open(marker, "w") as f:
                f.write("requested, not stored")
            time.sleep(600)  # the parent SIGKILLs us here
        return gold[uid]

    cfg = CareConfig(strategy="care", group_size=G, warmup_steps=1, budget_frac=0.25, global_budget=12)
    ctl = CareController(cfg, CallableOracle(judge, max_workers=1, timeout_s=900, backoff_s=0), store)
    out = {}
    start = 0
    if mode == "resume":
        ctl.load(ckpt)
        start = ctl.step
    for s in range(start, 3):
        b = batches[s]
        calls["n"] = 0
        d = ctl.decide(b.uids, b.ids, **b.kwargs())
        ctl.update()
        out[s] = {"source": d.source.tolist(), "rewards": d.rewards.tolist(),
                  "weight": d.weight.tolist(), "bought": d.labels_bought}
        if s == 0 and mode == "crash":
            ctl.save(ckpt)
    return out


if __name__ == "__main__":
    res = run(*sys.argv[1:5])
    print(json.dumps(res))
