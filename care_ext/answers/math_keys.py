"""Math answers: extraction of the last box and the cheap canonical key (pure Python, no sympy).

The key removes LaTeX noise that never changes the value (spacing commands, ``\\left``/``\\right``,
``\\dfrac``, ``\\text{}`` wrappers, a trailing period, degree marks, a currency sign ``\\$``, a
lone ``x=`` prefix, thousands separators) and turns integers, terminating decimals and fractions
of two integers into their exact reduced value, so "025" and "25" share a key and so do "0.5",
".50", "1/2" and "\\frac{1}{2}". Word answers ("none", "\\text{Evelyn}") are lower-cased and
match only the same words. It never maps two different integers to one key (the official code's
sympy normalisation maps "025" and "007" to "0"; this one works on the digit string). A comma
followed by a space is a list separator, never a thousands separator ("1, 100" is not 1100).
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

from .extract import last_braced_command
from .keys import CanonicalKey
from .numeval import evaluate_constant

__all__ = ["extract_math_answer", "math_key", "is_pathological_math"]

#: Answers longer than this (after normalisation) are never sent to the symbolic step.
DEFAULT_MAX_SYMBOLIC_CHARS = 200
#: Digit-count cap for turning decimals/fractions into exact rationals (integers have no cap:
#: they are compared on their digit strings).
_MAX_RATIONAL_DIGITS = 60

_SPACING = re.compile(r"\\[,;: ]|\\q?quad(?![a-zA-Z])|~")
# a negative thin space joins what it sits between ("32,\\!348" and "11,\\! 111" are thousands
# separators, as in math-verify): removed with the whitespace after it, not turned into a space
_NEG_SPACE = re.compile(r"\\!\s*")
# a currency sign ("\\$18.90", as MATH500 writes money): math-verify drops it; here too, before the
# math-mode "$" delimiters go (else "\\$36" would leave a stray "\\36" that parses as nothing)
_CURRENCY = re.compile(r"(?<!\\)\\\$")
# U+2212 MINUS SIGN, as models and typeset sources write it: math-verify reads "− 5" as -5, so
# the key does too (else "−5" and "-5" agree only through a math-verify call)
_UNICODE_MINUS = "\u2212"
_LEFT_RIGHT_DOT = re.compile(r"\\(?:left|right)\.")
_LEFT_RIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)[lr]?(?![a-zA-Z])")
_DISPLAY = re.compile(r"\\(?:displaystyle|textstyle)(?![a-zA-Z])")
_FRAC_ALIAS = re.compile(r"\\[dt]frac(?![a-zA-Z])")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_FRAC_DIGITS = re.compile(r"\\frac(\d)(\d)")
_FRAC_DIGIT_BRACE = re.compile(r"\\frac(\d)\{")
_FRAC_BRACE_DIGIT = re.compile(r"\\frac\{([^{}]*)\}(\d)")
_SQRT_DIGIT = re.compile(r"\\sqrt(\d)")
_SPACE_NOT_BETWEEN_LETTERS = re.compile(r"(?<![A-Za-z]) | (?![A-Za-z])")
# "1, 100" is a list (math-verify: the set {1, 100}), "1,100" is 1100: a space between a digit's
# comma and exactly three digits is kept, so the list neither gets the key of, nor parses as, 1100
_LIST_COMMA_SPACE = re.compile(r"(?<=\d,) (?=\d{3}(?!\d))")
_VAR_PREFIX = re.compile(r"^[A-Za-z]=(?!=)")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")

_INT = re.compile(r"^([+-]?)(\d+)$")
_DEC = re.compile(r"^[+-]?(?:\d+\.\d*|\.\d+)$")
_SLASH_FRAC = re.compile(r"^([+-]?)(\d+)/(\d+)$")
_TEX_FRAC = re.compile(r"^([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}$")
# a word answer ("none", "no solution", "Evelyn"): letters, spaces, ' and - only, with a run of
# at least 4 letters (so "p-q", "mn", "x" stay algebra)
_WORDS = re.compile(r"[A-Za-z][A-Za-z '\-]*")
_LONG_WORD = re.compile(r"[A-Za-z]{4,}")
# a numeric power tower of height >= 3 (2^{2^{2^{100}}}, 10^{10^{10}}): sympy evaluates it
_NUMERIC_TOWER = re.compile(r"\d\s*\^\s*\{?\s*\(?\s*\d+\s*\^\s*\{?\s*\(?\s*\d")


def extract_math_answer(text: str, context: object = None) -> str | None:
    """The content of the last brace-matched ``\\boxed{}``/``\\fbox{}`` of ``text``; ``None`` if none.

    ``context`` is accepted for the task-plug-in signature and ignored.
    """
    ans = last_braced_command(text)
    if ans is None or ans == "":
        return None
    return ans


def _normalise(s: str) -> str:
    s = s.replace(_UNICODE_MINUS, "-")
    s = _CURRENCY.sub("", s)
    s = s.replace("$", "")
    s = _NEG_SPACE.sub("", s)
    s = _LEFT_RIGHT_DOT.sub("", s)
    s = _LEFT_RIGHT.sub("", s)
    s = _DISPLAY.sub("", s)
    s = _FRAC_ALIAS.sub(r"\\frac", s)
    s = _SPACING.sub(" ", s)
    for _ in range(3):  # nested wrappers such as \text{\textbf{A}}
        t = _TEXT_WRAP.sub(r"\1", s)
        if t == s:
            break
        s = t
    s = _DEGREE.sub("", s)
    s = " ".join(s.split())
    s = _drop_spaces(s)
    s = _FRAC_DIGITS.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_DIGIT_BRACE.sub(r"\\frac{\1}{", s)
    s = _FRAC_BRACE_DIGIT.sub(r"\\frac{\1}{\2}", s)
    s = _SQRT_DIGIT.sub(r"\\sqrt{\1}", s)
    while s.endswith(".") or s.endswith("\\\\"):
        s = s[:-1] if s.endswith(".") else s[:-2]
    if s.count("=") == 1 and _VAR_PREFIX.match(s):
        s = s[2:]
    s = s.replace("{,}", ",")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


def _drop_spaces(s: str) -> str:
    """Remove the spaces not between two letters, except a list comma's (``_LIST_COMMA_SPACE``)."""

    def keep_list_space(m: re.Match) -> str:
        return " " if _LIST_COMMA_SPACE.match(s, m.start()) else ""

    return _SPACE_NOT_BETWEEN_LETTERS.sub(keep_list_space, s)


def _int_text(sign: str, digits: str) -> str:
    digits = digits.lstrip("0") or "0"
    return "-" + digits if sign == "-" and digits != "0" else digits


def _rational(s: str) -> Fraction | None:
    """Exact value of a decimal or integer fraction, or None (also for oversize digit strings)."""
    if _DEC.match(s):
        if len(s) > _MAX_RATIONAL_DIGITS:
            return None
        return Fraction(s)
    m = _SLASH_FRAC.match(s) or _TEX_FRAC.match(s)
    if m:
        sign, p, q = m.groups()
        if len(p) + len(q) > _MAX_RATIONAL_DIGITS or int(q) == 0:
            return None
        v = Fraction(int(p), int(q))
        return -v if sign == "-" else v
    return None


def _number_key(value: Fraction) -> CanonicalKey:
    approx = _float(value)
    if value.denominator == 1:
        text = str(value.numerator)
        return CanonicalKey(text=text, number=True, symbolic=True, latex=text, value=approx)
    p, q = value.numerator, value.denominator
    latex = ("-" if p < 0 else "") + "\\frac{%d}{%d}" % (abs(p), q)
    return CanonicalKey(text=f"{p}/{q}", number=True, symbolic=True, latex=latex, value=approx)


def _float(value: Fraction | str) -> float | None:
    try:
        if isinstance(value, str):
            if len(value) > 300:
                return None
            return float(int(value))
        return float(value)
    except (OverflowError, ValueError):
        return None


def is_pathological_math(key_text: str, max_symbolic_chars: int = DEFAULT_MAX_SYMBOLIC_CHARS) -> bool:
    """True for answers never sent to the symbolic step: longer than ``max_symbolic_chars``
    characters, or containing a numeric power tower of height >= 3 (e.g. ``10^{10^{10}}``)."""
    return len(key_text) > max_symbolic_chars or _NUMERIC_TOWER.search(key_text) is not None


#: extracted answers whose keys are remembered (the key is a pure function of the string)
KEY_CACHE_SIZE = 262_144


def math_key(
    answer: str, context: object = None, *, max_symbolic_chars: int = DEFAULT_MAX_SYMBOLIC_CHARS
) -> CanonicalKey | None:
    """Canonical key of an extracted math answer (see the module docstring).

    Args:
        answer: the extracted answer (content of the box), any string.
        context: ignored (task-plug-in signature).
        max_symbolic_chars: answers longer than this are exact-match only (``symbolic=False``).

    Returns:
        a :class:`CanonicalKey`, or ``None`` when the normalised answer is empty. Results for
        answers up to 1,000 characters are cached (LRU, :data:`KEY_CACHE_SIZE` entries).
    """
    if len(answer) <= 1000:
        return _math_key_cached(answer, max_symbolic_chars)
    return _math_key(answer, max_symbolic_chars)


def _math_key(answer: str, max_symbolic_chars: int) -> CanonicalKey | None:
    if len(answer) > 50 * max_symbolic_chars:  # huge: do not even normalise, exact match only
        return CanonicalKey(text=answer, number=False, symbolic=False, latex=answer)
    s = _normalise(answer)
    if not s:
        return None
    m = _INT.match(s)
    if m:  # integers by value, on the digit string (no int() size limit, "025" -> "25")
        text = _int_text(*m.groups())
        return CanonicalKey(text=text, number=True, symbolic=True, latex=text, value=_float(text))
    value = _rational(s)
    if value is not None:
        return _number_key(value)
    if _WORDS.fullmatch(s) and _LONG_WORD.search(s):
        # words parse as products of one-letter symbols in math-verify ("four" = f*o*u*r), which
        # is meaningless and slow: word answers match only the same words (case-insensitive)
        text = " ".join(s.lower().split())
        return CanonicalKey(text=text, number=False, symbolic=False, latex=text)
    symbolic = not is_pathological_math(s, max_symbolic_chars)
    return CanonicalKey(
        text=s, number=False, symbolic=symbolic, latex=s, value=evaluate_constant(s) if symbolic else None
    )


_math_key_cached = lru_cache(maxsize=KEY_CACHE_SIZE)(_math_key)
