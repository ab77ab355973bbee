"""The fast constant evaluator may only prove answers unequal where math-verify would agree."""

import math

import pytest

from care_ext.answers import answer_ids
from care_ext.answers.numeval import evaluate_constant

B = "\\boxed{%s}"


@pytest.mark.parametrize(
    "s,v",
    [("2\\sqrt{3}", 2 * math.sqrt(3)), ("3\\pi", 3 * math.pi), ("2\\cdot\\frac{1}{2}", 1.0), ("(2)\\frac{1}{2}", 1.0),
     ("\\sqrt{2}\\frac{1}{2}", math.sqrt(2) / 2), ("-2^{2}", -4.0), ("\\frac{1}{2}", 0.5)],
)
def test_values(s, v):
    assert evaluate_constant(s) == pytest.approx(v)


@pytest.mark.parametrize("s,mixed", [("1\\frac{4}{5}", 1.8), ("137\\frac{1}{2}", 137.5), ("2\\dfrac{1}{3}", 7 / 3)])
def test_a_mixed_number_is_never_read_as_a_product(s, mixed):
    # math-verify (and MATH500's golds "1\frac{4}{5}", "137 \frac{1}{2}") read these as mixed
    # numbers; the product 4/5 would make "9/5" look clearly different from the gold
    v = evaluate_constant(s)
    assert v is None or v == pytest.approx(mixed)


def test_math500_mixed_number_golds_match(data_dir, inline):
    import json

    golds = {json.loads(line)["answer"] for line in open(data_dir / "math500.jsonl")}
    cases = {"1\\frac{4}{5}": ("\\frac{9}{5}", "1.8", "\\frac{4}{5}"), "137 \\frac{1}{2}": ("\\frac{275}{2}", "137.5", "68.5")}
    assert set(cases) <= golds
    r = [[B % g] + [B % a for a in alts] for g, alts in cases.items()]
    ids, gid = answer_ids(r, "math", list(cases), clusterer=inline)
    for row, g in zip(ids.tolist(), gid.tolist()):
        assert row[0] == row[1] == row[2] == g != row[3]
