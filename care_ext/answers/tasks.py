"""Registration of the built-in tasks: "math", "kk" and "arith"."""

from __future__ import annotations

from .arith import arith_gold_key, arith_key, extract_arith_answer
from .keys import CanonicalKey
from .kk import extract_kk_answer, kk_gold_key, kk_key, puzzle_names
from .math_equiv import MathVerifyEquivalence
from .math_keys import extract_math_answer, math_key
from .registry import AnswerTask, register_task

__all__ = ["math_gold_key", "MATH_EQUIVALENCE"]

#: default symbolic equivalence of the "math" task (1 s parse and verify limits)
MATH_EQUIVALENCE = MathVerifyEquivalence()


def math_gold_key(gold: object, context: object = None) -> CanonicalKey | None:
    """Key of a math gold label (a string such as "025" or "\\frac{1}{2}", or a number).

    A gold string that itself holds a ``\\boxed{}`` is reduced to its last box.
    """
    if gold is None or isinstance(gold, bool):
        return None
    if hasattr(gold, "item") and not isinstance(gold, str):
        gold = gold.item()
    text = str(gold).strip()
    boxed = extract_math_answer(text)
    if boxed is not None:
        text = boxed
    return math_key(text) if text else None


def _register_builtins() -> None:
    register_task(
        AnswerTask("math", extract_math_answer, math_key, math_gold_key, MATH_EQUIVALENCE), replace=True
    )
    register_task(AnswerTask("kk", extract_kk_answer, kk_key, kk_gold_key, None, needs_context=True, prepare_context=puzzle_names), replace=True)
    register_task(AnswerTask("arith", extract_arith_answer, arith_key, arith_gold_key, None), replace=True)


_register_builtins()
