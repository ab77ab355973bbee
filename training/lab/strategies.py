"""Bridge from the lab to the strategies of the CARE core (TEMPORARY: scaffold until the core lands)."""
from __future__ import annotations

UNBUDGETED = ("gt", "ttrl", "ttrl-mask")


def available_methods() -> tuple[str, ...]:
    """Every strategy the lab can run."""
    return ("gt", "ttrl", "ttrl-mask", "random", "oracle")


def is_budgeted(method: str) -> bool:
    """Whether the strategy buys a budgeted subset of labels (then it runs once per budget)."""
    return method not in UNBUDGETED
