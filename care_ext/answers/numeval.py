"""A tiny, strict evaluator of constant LaTeX arithmetic, used only to prove two answers unequal.

Accepted: decimal numbers, ``+ - * / ^``, ``\\cdot``, ``\\times``, ``\\div``, implicit
multiplication, ``\\frac{}{}``, ``\\sqrt{}``, ``\\sqrt[n]{}``, ``\\pi``, parentheses and braces.
A number directly followed by ``\\frac`` is refused: it is a mixed number ("1\\frac{4}{5}" = 9/5,
as math-verify and MATH500 read it), which implicit multiplication would get wrong.
Anything else (letters, commas, sets, intervals, percent, units, ``e``, ``i``, functions) makes
the whole answer "not evaluable" (``None``) and leaves the decision to math-verify. Overflow,
division by zero and complex results also give ``None``.

Two keys that both evaluate, to values farther apart than a relative ``1e-4``, are unequal
without a symbolic call (math-verify compares such constants by value and rounds floats to 6
decimals, so it would reject them too). Equal-looking values are never *accepted* here: they
still go to math-verify.
"""

from __future__ import annotations

import math
import re

__all__ = ["evaluate_constant", "clearly_different", "DEFAULT_REL_TOL"]

#: relative gap above which two evaluable answers are declared different
DEFAULT_REL_TOL = 1e-4
_MAX_LEN = 120
_MAX_ABS = 1e200

_TOKEN = re.compile(r"\s*(?:(\d+\.\d*|\.\d+|\d+)|(\\[a-zA-Z]+)|(.))")
_FRACS = ("\\frac", "\\dfrac", "\\tfrac")
_COMMANDS = {*_FRACS, "\\sqrt", "\\pi", "\\cdot", "\\times", "\\div"}


class _Fail(Exception):
    pass


def _tokenise(s: str) -> list[str]:
    out = []
    pos = 0
    n = len(s)
    while pos < n:
        m = _TOKEN.match(s, pos)
        if m is None:
            break
        num, cmd, ch = m.groups()
        if num is not None:
            out.append(num)
        elif cmd is not None:
            if cmd not in _COMMANDS:
                raise _Fail
            out.append(cmd)
        elif ch is not None:
            if ch not in "+-*/^(){}[]":
                raise _Fail
            out.append(ch)
        pos = m.end()
    return out


class _Parser:
    def __init__(self, toks: list[str]):
        self.t = toks
        self.i = 0

    def peek(self) -> str | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self, want: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (want is not None and tok != want):
            raise _Fail
        self.i += 1
        return tok

    def expr(self) -> float:
        v = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            w = self.term()
            v = v + w if op == "+" else v - w
        return v

    def term(self) -> float:
        v = self.unary()
        while True:
            tok = self.peek()
            if tok in ("*", "\\cdot", "\\times"):
                self.take()
                v *= self.unary()
            elif tok in ("/", "\\div"):
                self.take()
                d = self.unary()
                if d == 0:
                    raise _Fail
                v /= d
            elif tok is not None and (tok[0].isdigit() or tok[0] == "." or tok in ("(", "{", *_FRACS, "\\sqrt", "\\pi")):
                # implicit multiplication, e.g. 2\sqrt{3} or 3\pi; a number right after a number
                # cannot happen (the tokeniser is greedy) except "2{3}", rejected as ambiguous
                if tok[0].isdigit() or tok[0] == "." or tok == "{":
                    raise _Fail
                if tok in _FRACS and self._after_number():
                    raise _Fail  # "1\frac{4}{5}" is the mixed number 9/5 in math-verify, not 4/5
                v *= self.power()
            else:
                return v

    def _after_number(self) -> bool:
        """Whether the token just consumed is a number literal."""
        prev = self.t[self.i - 1] if self.i > 0 else ""
        return prev[:1].isdigit() or prev[:1] == "."

    def unary(self) -> float:
        tok = self.peek()
        if tok == "-":
            self.take()
            return -self.unary()
        if tok == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self) -> float:
        base = self.atom()
        if self.peek() == "^":
            self.take()
            tok = self.peek()
            if tok == "{":
                self.take()
                e = self.expr()
                self.take("}")
            elif tok is not None and tok.isdigit() and len(tok) == 1:
                self.take()
                e = float(tok)
            elif tok is not None and tok.isdigit():
                raise _Fail  # "2^34" means 2^3*4 in LaTeX: refuse rather than guess
            else:
                e = self.unary()
            if abs(e) > 1000 or (base < 0 and e != int(e)) or (base == 0 and e < 0):
                raise _Fail
            v = base**e
            if isinstance(v, complex):
                raise _Fail
            return v
        return base

    def atom(self) -> float:
        tok = self.take()
        if tok[0].isdigit() or tok[0] == ".":
            if len(tok) > 30:
                raise _Fail
            return float(tok)
        if tok == "(":
            v = self.expr()
            self.take(")")
            return v
        if tok == "{":
            v = self.expr()
            self.take("}")
            return v
        if tok == "\\pi":
            return math.pi
        if tok in ("\\frac", "\\dfrac", "\\tfrac"):
            a = self.group()
            b = self.group()
            if b == 0:
                raise _Fail
            return a / b
        if tok == "\\sqrt":
            n = 2.0
            if self.peek() == "[":
                self.take()
                n = self.expr()
                self.take("]")
                if n != int(n) or n < 2:
                    raise _Fail
            x = self.group()
            if x < 0:
                if n % 2 == 1:
                    return -((-x) ** (1.0 / n))
                raise _Fail
            return x ** (1.0 / n)
        raise _Fail

    def group(self) -> float:
        tok = self.peek()
        if tok == "{":
            self.take()
            v = self.expr()
            self.take("}")
            return v
        if tok is not None and tok[0].isdigit():  # \frac12 style: one digit per argument
            self.take()
            if len(tok) == 1:
                return float(tok)
            raise _Fail
        raise _Fail


def evaluate_constant(s: str) -> float | None:
    """Value of ``s`` if it is constant arithmetic in the accepted subset, else ``None``."""
    if not s or len(s) > _MAX_LEN:
        return None
    try:
        toks = _tokenise(s)
        if not toks:
            return None
        p = _Parser(toks)
        v = p.expr()
        if p.i != len(toks):
            return None
    except (_Fail, OverflowError, ZeroDivisionError, ValueError, RecursionError, IndexError):
        return None
    if not isinstance(v, float) or math.isnan(v) or math.isinf(v) or abs(v) > _MAX_ABS:
        return None
    return v


def clearly_different(a: float | None, b: float | None, rel_tol: float = DEFAULT_REL_TOL) -> bool:
    """True when both values are known and ``|a-b| > rel_tol * max(1, |a|, |b|)``."""
    if a is None or b is None:
        return False
    return abs(a - b) > rel_tol * max(1.0, abs(a), abs(b))
