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
        ("\u22125", "-5"),
        ("\u2212\\frac{3}{6}", "-0.5"),
        ("x^2 \u2212 1", "x^2-1"),
    ],
)
def test_same_key(a, b):
    assert math_key(a).text == math_key(b).text


@pytest.mark.parametrize("a,b", [("025", "007"), ("025", "0"), ("10", "100"), ("-5", "5"), ("\u22125", "5"), ("1/2", "1/3"), ("0.1", "1")])
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


@pytest.mark.parametrize(
    "a,b",
    [("\\$18.90", "18.9"), ("\\$36", "36"), ("\\$32,\\!348", "32348"), ("32,\\!348", "32,348"),
     ("\\$ 5", "5"), ("11,\\! 111,\\! 111,\\! 100", "11111111100")],
)
def test_currency_sign_and_negative_thin_space(a, b):
    # MATH500 writes money as "\$18.90" and "\$32,\!348"; math-verify reads them as 18.9 and
    # 32348, so the key must not leave a stray "\18.90" (which math-verify cannot parse)
    ka, kb = math_key(a), math_key(b)
    assert ka.number and ka.text == kb.text


def test_comma_space_is_a_list_not_a_thousands_separator():
    # math-verify: "1,100" is 1100 but "1, 100" is the set {1, 100}
    assert math_key("1,100").text == "1100"
    for lst in ["1, 100", "1,\\ 100", "2, 025"]:
        k = math_key(lst)
        assert not k.number and k.text not in ("1100", "2025")


def test_math500_money_golds_match_plain_answers(data_dir, inline):
    import json

    from care_ext.answers import answer_ids

    golds = [json.loads(line)["answer"] for line in open(data_dir / "math500.jsonl")]
    money = [g for g in golds if g.startswith("\\$")]
    assert len(money) >= 3
    plain = {"\\$32,\\!348": "32348", "\\$18.90": "18.9", "\\$36": "36"}
    assert set(plain) <= set(money)
    r = [["\\boxed{%s}" % plain[g], "\\boxed{%s}" % g, "\\boxed{7}"] for g in plain]
    ids, gid = answer_ids(r, "math", list(plain), clusterer=inline)
    for row, g in zip(ids.tolist(), gid.tolist()):
        assert row[0] == row[1] == g != row[2]


def test_list_answer_is_not_the_number(inline):
    from care_ext.answers import answer_ids

    B = "\\boxed{%s}"
    r = [[B % "1, 100", B % "1100", B % "1,100", B % "1,\\ 100"]]
    ids, gid = answer_ids(r, "math", ["1100"], clusterer=inline)
    ids = ids[0].tolist()
    assert ids[1] == ids[2] == gid.item() and ids[0] == ids[3] != ids[1]
