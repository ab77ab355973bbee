"""The CPU miniature's arithmetic task ("arith"): the digit answer between ``#`` and the end mark.

A response of the miniature (notes/tiny_lab.md) is the K intermediate values, ``#``, the answer
digit(s) and the end mark ``$``, e.g. ``"1,4,2#2$"``. Everything after the first end mark is
ignored (sampling may run past it). The answer is the text after the last ``#`` before the end
mark and must be a non-empty string of ASCII digits; anything else is unparseable. Equivalence is
integer value ("02" == "2").
"""

from __future__ import annotations

from .keys import CanonicalKey

__all__ = ["extract_arith_answer", "arith_key", "arith_gold_key", "END_MARK", "ANSWER_MARK"]

#: the miniature's end-of-sequence character
END_MARK = "$"
#: the character that precedes the answer
ANSWER_MARK = "#"


def extract_arith_answer(
    text: str, context: object = None, *, end_mark: str = END_MARK, answer_mark: str = ANSWER_MARK,
    require_end_mark: bool = True,
) -> str | None:
    """The digit string after the last ``answer_mark`` before the first ``end_mark``; else None.

    With ``require_end_mark`` (default, as in the miniature) a response without the end mark is
    unparseable.
    """
    cut = text.find(end_mark)
    if cut < 0:
        if require_end_mark:
            return None
        cut = len(text)
    body = text[:cut]
    pos = body.rfind(answer_mark)
    if pos < 0:
        return None
    ans = body[pos + len(answer_mark):]
    if not ans or not (ans.isascii() and ans.isdigit()):
        return None
    return ans


def arith_key(answer: str, context: object = None) -> CanonicalKey | None:
    """Integer-value key of an extracted digit string ("007" -> "7")."""
    text = answer.lstrip("0") or "0"
    return CanonicalKey(text=text, number=True, symbolic=False, latex=text)


def arith_gold_key(gold: object, context: object = None) -> CanonicalKey | None:
    """Key of an arith gold label (an ``int`` or a digit string); None if not a non-negative integer."""
    if isinstance(gold, bool):
        return None
    if hasattr(gold, "item") and not isinstance(gold, str):
        gold = gold.item()
    if isinstance(gold, int):
        return arith_key(str(gold)) if gold >= 0 else None
    if isinstance(gold, str) and gold.strip().isascii() and gold.strip().isdigit():
        return arith_key(gold.strip())
    return None
