"""Realistic response variants of a gold answer, for the tests and bench/bench_answers.py.

Three kinds, each a full response string:

* ``equivalent``: the same answer written differently (zero padding, ``\\dfrac``, spacing,
  ``\\left(``, a trailing period, ``x =`` prefix, decimal form of a terminating fraction,
  ``+0`` appended to constant arithmetic, which only math-verify can see through);
* ``near_miss``: a different answer that looks alike (off by one, one digit changed, sign
  flipped, ``+1`` appended);
* ``garbage``: no box, a truncated box, an empty box, words in the box.

Deterministic for a given ``seed``. Not used by the clustering itself.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction

from .math_keys import math_key

__all__ = ["equivalent_forms", "near_misses", "garbage_responses", "boxed"]


def boxed(ans: str, rng: random.Random | None = None) -> str:
    """A response whose final answer is ``\\boxed{ans}`` (with some reasoning-like text)."""
    lead = "" if rng is None else rng.choice(["", "We compute step by step. ", "Thus we have $y=2$ and so "])
    return f"{lead}The final answer is $\\boxed{{{ans}}}$."


def equivalent_forms(gold: str) -> list[str]:
    """Answer strings (not responses) equal to ``gold``, the gold itself first."""
    g = gold.strip()
    out = [g]
    key = math_key(g)
    if key is not None and key.number:
        if "/" in key.text:
            p, q = key.text.split("/")
            sign = "-" if p.startswith("-") else ""
            p = p.lstrip("-")
            out += [f"{sign}\\frac{{{p}}}{{{q}}}", f"{sign}\\dfrac{{{p}}}{{{q}}}", f"{sign}{p}/{q}"]
            d = Fraction(int(sign + p), int(q))
            qq = d.denominator
            while qq % 2 == 0:
                qq //= 2
            while qq % 5 == 0:
                qq //= 5
            if qq == 1:  # terminating decimal
                out.append(_decimal(d))
        else:
            n = key.text
            neg = n.startswith("-")
            digits = n.lstrip("-")
            out += [("-" if neg else "") + "0" + digits, n + ".0", f"\\text{{{n}}}", f"{n}.", f"x = {n}", f"\\frac{{{2 * int(n)}}}{{2}}" if len(digits) < 15 else n]
    else:
        s = g.replace("\\frac", "\\dfrac") if "\\frac" in g else g
        out.append(s)
        spaced = re.sub(r"([+=,])", r" \1 ", g)
        out.append(spaced)
        if g.startswith("(") and g.endswith(")") and g.count("(") == 1:
            out.append("\\left(" + g[1:-1] + "\\right)")
        out.append(g + ".")
        if key is not None and key.value is not None:
            out.append(g + "+0")
    seen, uniq = set(), []
    for a in out:
        if a not in seen:
            seen.add(a)
            uniq.append(a)
    return uniq


def _decimal(d: Fraction) -> str:
    sign = "-" if d < 0 else ""
    d = abs(d)
    whole = d.numerator // d.denominator
    rest = d - whole
    digits = ""
    while rest and len(digits) < 30:
        rest *= 10
        digits += str(rest.numerator // rest.denominator)
        rest -= rest.numerator // rest.denominator
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def near_misses(gold: str, rng: random.Random) -> list[str]:
    """Answer strings that differ from ``gold`` but look alike (best effort, usually 2-3)."""
    g = gold.strip()
    key = math_key(g)
    out = []
    if key is not None and key.number and "/" not in key.text:
        n = int(key.text) if len(key.text) < 30 else 0
        out += [str(n + 1), str(n - 1), str(10 * n + rng.randrange(1, 10))]
    else:
        digits = [i for i, c in enumerate(g) if c.isdigit()]
        if digits:
            i = rng.choice(digits)
            new = rng.choice([d for d in "123456789" if d != g[i]])
            out.append(g[:i] + new + g[i + 1 :])
        if g.startswith("-"):
            out.append(g[1:])
        elif key is not None and key.value is not None:
            out.append("-" + g)
        elif not digits:
            out.append(g + "+1")
    return [a for a in out if a != g]


def garbage_responses(gold: str, rng: random.Random) -> list[str]:
    """Responses without a usable answer or with a meaningless one."""
    return [
        f"I think the answer is {gold} but I am not sure.",  # no box: invalid
        f"So the result is \\boxed{{{gold}",  # truncated: invalid
        "\\boxed{}",  # empty: invalid
        "\\boxed{" + rng.choice(["no solution", "undefined", "cannot be determined", "\\text{none}"]) + "}",
    ]
