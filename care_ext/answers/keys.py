"""The canonical key of an answer: what the fast path groups on before any symbolic check."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CanonicalKey"]


@dataclass(frozen=True, slots=True)
class CanonicalKey:
    """Canonical form of one extracted answer.

    Attributes:
        text: the normalised answer string. Two answers with equal ``text`` are the same answer
            (same cluster, no further check). For exact numbers it is the reduced value, e.g.
            ``"25"`` for ``"025"`` and ``"1/2"`` for ``"0.5"`` or ``"\\frac{1}{2}"``.
        number: ``True`` when the answer is an exact rational number (integer, terminating
            decimal or a fraction of two integers). Two *different* number keys are never
            equivalent, and a cluster holds at most one number key (integers and simple
            fractions are compared by value only).
        symbolic: ``True`` when the key may be compared with other keys by the task's symbolic
            equivalence. ``False`` for tasks whose keys are exact (K&K, arith) and for answers
            judged pathological (too long, numeric power towers): those only ever merge with
            identical keys.
        latex: the string handed to the symbolic equivalence (for math: the answer to be wrapped
            in ``\\boxed{}``); equal to ``text`` unless the task renders numbers differently.
        value: the answer's numeric value when it is constant arithmetic the fast evaluator
            understands (:mod:`care_ext.answers.numeval`), else ``None``. Two keys whose values
            are both known and clearly different are unequal without a symbolic call.
    """

    text: str
    number: bool = False
    symbolic: bool = False
    latex: str = ""
    value: float | None = None

    def symbolic_form(self) -> str:
        """The string the symbolic equivalence parses (``latex`` or, if empty, ``text``)."""
        return self.latex or self.text
