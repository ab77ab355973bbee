"""Symbolic equivalence of two math answers with HuggingFace math-verify.

Each answer is parsed as ``\\boxed{answer}`` (bare strings parse wrongly or not at all, see
tasks_and_answers.md §1.4) and two answers are equal only if ``verify`` holds in *both*
directions (verify is asymmetric for relations and intervals). Parse results are cached per
process. Every parse and every verify runs under a float-seconds :func:`time_limit` when the
caller is a main thread (always the case in the worker processes); a timeout or any error counts
as "not equal" (a failed parse makes the answer unequal to every other key).

math-verify is imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass

from .timelimit import SymbolicTimeout, can_time_limit, time_limit

__all__ = ["MathVerifyEquivalence", "based_integer"]

_PARSE_CACHE: "OrderedDict[tuple, list | None]" = OrderedDict()


_BASED_INTEGER = re.compile(r"\s*([0-9A-Z]+)\s*_\s*(?:\{\s*([0-9]+)\s*\}|([0-9]))\s*")


def based_integer(latex: str) -> tuple[str, int] | None:
    """(digits, base) of an integer written with its base as a subscript (``4210_{5}``,
    ``52_8``; base 2..36, digits valid in it, leading zeros dropped), else None. math-verify
    reads the subscript as an index and drops it, so it finds ``4210_{5}`` equal to
    ``4210_{9}``; two such answers are compared here instead."""
    m = _BASED_INTEGER.fullmatch(latex)
    if m is None:
        return None
    digits, base = m.group(1), int(m.group(2) or m.group(3))
    try:  # the digits must be digits of that base (A_1, A_2: subscripted names, not numbers)
        int(digits, base)
    except ValueError:
        return None
    return digits.lstrip("0") or "0", base


class _NoDisabledTimeoutWarning(logging.Filter):
    """math-verify warns once that its timeouts are off; ours (time_limit) are on instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoDisabledTimeoutWarning())


@dataclass(frozen=True)
class MathVerifyEquivalence:
    """Picklable settings + callable ``equal(a, b) -> bool`` used by the symbolic step.

    Attributes:
        parse_timeout_s: wall-time limit of one ``parse`` (default 1.0 s, as URLVR/CARE use 1 s).
        verify_timeout_s: wall-time limit of one ``verify`` direction (default 1.0 s).
        float_rounding: math-verify's ``float_rounding`` (decimal places compared, default 6).
        strict: math-verify's ``strict`` (variables must match, default True).
        parse_cache_size: parsed answers kept per process (LRU).
    """

    parse_timeout_s: float = 1.0
    verify_timeout_s: float = 1.0
    float_rounding: int = 6
    strict: bool = True
    parse_cache_size: int = 100_000

    def parsed(self, latex: str) -> list | None:
        """math-verify parse of ``\\boxed{latex}`` (cached); ``None`` if unparsable or timed out."""
        key = (latex,)
        try:
            hit = _PARSE_CACHE[key]
            _PARSE_CACHE.move_to_end(key)
            return hit
        except KeyError:
            pass
        from math_verify import parse  # lazy: heavy import (sympy, antlr)

        limited = can_time_limit()
        try:
            with time_limit(self.parse_timeout_s if limited else None):
                out = parse("\\boxed{" + latex + "}", parsing_timeout=None)
        except SymbolicTimeout:
            out = None
        except Exception:  # noqa: BLE001 - any parser failure = unparsable answer
            out = None
        if not out:
            out = None
        _PARSE_CACHE[key] = out
        if len(_PARSE_CACHE) > self.parse_cache_size:
            _PARSE_CACHE.popitem(last=False)
        return out

    def _verify(self, gold: list, pred: list) -> bool:
        from math_verify import verify

        limited = can_time_limit()
        try:
            with time_limit(self.verify_timeout_s if limited else None):
                return bool(
                    verify(
                        gold,
                        pred,
                        float_rounding=self.float_rounding,
                        strict=self.strict,
                        timeout_seconds=None,
                    )
                )
        except SymbolicTimeout:
            return False
        except Exception:  # noqa: BLE001
            return False

    def __call__(self, a: str, b: str) -> bool:
        """True iff answers ``a`` and ``b`` (LaTeX strings, no box) verify equal both ways; two
        integers with base subscripts (:func:`based_integer`) iff digits and base agree."""
        if a == b:
            return True
        ba, bb = based_integer(a), based_integer(b)
        if ba is not None and bb is not None:  # both with a base: same digits, same base
            return ba == bb
        pa = self.parsed(a)
        if pa is None:
            return False
        pb = self.parsed(b)
        if pb is None:
            return False
        return self._verify(pa, pb) and self._verify(pb, pa)

    def warm_up(self) -> None:
        """Import math-verify and run one parse+verify, so the first real check is not slow."""
        self("\\frac{1}{2}", "0.5")
