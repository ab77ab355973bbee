"""One registry of acquisition strategies with the same budget semantics (see :mod:`.base`).

==================  =========================================================  ===============
name                what is bought / trusted                                   simulation-only
==================  =========================================================  ===============
gt                  buy every prompt                                           no
ttrl                buy nothing, trust every pseudo-label                      no
ttrl-mask           buy nothing, trust only correct majorities                 yes
random[-mask]       buy uniformly at random                                    no
entropy[-mask]      buy the highest answer-cluster entropy                     no
prob[-mask]         buy the lowest mean token probability                      no
oracle[-mask]       buy the highest true CAG                                   yes
oracle-decay        oracle's buys, the rest weighted exp(-lambda * true CAG)   yes
care                Stage-I trust gate + Stage-II expected-CAG buys            no
care-<ablation>     regression, no-pseudo, no-stage2, no-aux, no-balance       no
care-entropy        Stage-I trust gate + highest answer-entropy buys           no
==================  =========================================================  ===============
"""
from __future__ import annotations

from typing import Callable

from ..config import ceil_frac
from .base import Plan, StepContext, Strategy, top_rows
from .baselines import GT, TTRL, Entropy, Prob, Random
from .care import Care
from .oracle import OracleCAG, OracleDecay, TTRLMask

STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "gt": GT,
    "ttrl": TTRL,
    "ttrl-mask": TTRLMask,
    "oracle-decay": OracleDecay,
}
for _cls in (Random, Entropy, Prob):
    for _mask in (False, True):
        STRATEGIES[_cls.base_name + ("-mask" if _mask else "")] = (
            lambda c=_cls, m=_mask: c(mask=m))
STRATEGIES["oracle"] = lambda: OracleCAG(mask=False)
STRATEGIES["oracle-mask"] = lambda: OracleCAG(mask=True)
for _v in Care.VARIANTS:
    STRATEGIES["care" + (f"-{_v}" if _v else "")] = lambda v=_v: Care(v)


def get_strategy(name: str) -> Strategy:
    """A fresh strategy object by registry name (ValueError lists the known names)."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {sorted(STRATEGIES)}") from None


__all__ = ["STRATEGIES", "get_strategy", "Plan", "StepContext", "Strategy", "ceil_frac", "top_rows"]
