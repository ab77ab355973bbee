import pytest

from care_ext.answers.math_keys import math_key


@pytest.mark.parametrize(
    "a,b",
    [
        ("025", "25"),
        ("007", "7"),
        ("+25", "25"),
        ("25.0", "25"),
        ("25.", "25"),
        ("\\text{25}", "25"),
        ("x = 25", "25"),
        ("1{,}000", "1000"),
        ("1,000", "1000"),
        ("0.5", "\\frac{1}{2}"),
        (".50", "1/2"),
        ("\\dfrac12", "\\frac{1}{2}"),
        ("\\tfrac{1}{2}", "0.5"),
        ("-\\frac{3}{6}", "-0.5"),
        ("\\frac{-1}{2}", "-1/2"),
        ("90^\\circ", "90"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("\\frac {\\sqrt 3} {2}", "\\frac{\\sqrt{3}}{2}"),
        ("\\text{Evelyn}", "evelyn"),
        ("$5$", "5"),
    ],
)
def test_same_key(a, b):
    assert math_key(a).text == math_key(b).text


@pytest.mark.parametrize("a,b", [("025", "007"), ("025", "0"), ("10", "100"), ("-5", "5"), ("1/2", "1/3"), ("0.1", "1")])
def test_distinct_numbers_have_distinct_keys(a, b):
    ka, kb = math_key(a), math_key(b)
    assert ka.number and kb.number and ka.text != kb.text


def test_huge_integers_are_compared_on_digits():
    big = "9" * 6000  # beyond int()'s default digit limit
    assert math_key("000" + big).text == big
    assert math_key(big).text != math_key(big + "1").text


def test_spaces_between_letters_are_kept():
    assert math_key("\\pi r").text == "\\pi r"
    assert math_key("\\pi r").text != math_key("\\pir").text


def test_pathological_answers_are_exact_only():
    for bad in ["2^{2^{2^{100}}}", "10^{10^{10}}", "x+" * 200 + "1"]:
        k = math_key(bad)
        assert k is not None and not k.symbolic
    assert math_key("2^{2^{n}}").symbolic


def test_empty_answer_is_invalid():
    assert math_key("  ") is None and math_key("$$") is None
