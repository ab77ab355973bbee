"""Knights-and-Knaves: phrasings, names from the puzzle, gold mapping on the staged puzzles."""

import json

import pytest

from care_ext.answers import answer_ids
from care_ext.answers.kk import kk_key, puzzle_names

QUIZ = ("A very special island is inhabited only by knights and knaves. Knights always tell the truth, "
        "and knaves always lie. You meet 2 inhabitants: Zoey, and Oliver. Zoey said ... So who is a "
        "knight and who is a knave?")


def A(s):
    return f"<think>reasoning</think><answer>{s}</answer>"


def test_names_from_puzzle_text_and_records():
    assert puzzle_names(QUIZ) == ("Zoey", "Oliver")
    assert puzzle_names({"names": ["A", "B"]}) == ("A", "B")
    assert puzzle_names({"quiz": QUIZ}) == ("Zoey", "Oliver")
    with pytest.raises(ValueError):
        puzzle_names("no puzzle here")


@pytest.mark.parametrize(
    "text",
    [
        "Zoey is a knave, Oliver is a knight",
        "Oliver is a knight. Zoey is a knave.",
        "(1) Zoey is a knave\n(2) Oliver is a knight",
        "oliver=knight|zoey=knave",
        "Zoey: knave, Oliver: knight",
        "zoey is knave and OLIVER is an knight",
    ],
)
def test_phrasings_give_one_key(text):
    assert kk_key(text, ["Zoey", "Oliver"]).text == "oliver=knight|zoey=knave"


@pytest.mark.parametrize(
    "text,key",
    [
        ("Zoey and Oliver are knights.", "max=None"),  # Max missing
        ("Zoey and Oliver are knights, and Max is a knave", "max=knave|oliver=knight|zoey=knight"),
        ("Both Zoey and Max are knaves; Oliver is a knight", "max=knave|oliver=knight|zoey=knave"),
        ("Zoey, Oliver, and Max are all knaves.", "max=knave|oliver=knave|zoey=knave"),
        ("Zoey is a knight and Oliver and Max are knaves", "max=knave|oliver=knave|zoey=knight"),
        ("(1) Max is a knave (2) Zoey and Oliver are both knights", "max=knave|oliver=knight|zoey=knight"),
        ("Zoey and Oliver are not knights, Max is a knave", None),  # negation: no role
        ("Zoey and Oliver are knights. Zoey and Max are knaves.", None),  # Zoey twice, differently
    ],
)
def test_plural_statements(text, key):
    got = kk_key(text, ["Zoey", "Oliver", "Max"])
    if key is None or key.endswith("None"):
        assert got is None
    else:
        assert got.text == key


@pytest.mark.parametrize(
    "text",
    [
        "Zoey is a knave",  # Oliver missing
        "Zoey is a knave, Zoey is a knight, Oliver is a knight",  # contradictory
        "Zoey is not a knight, Oliver is a knight",  # negation is not a role
        "Zoe is a knave, Oliver is a knight",  # a name not in the puzzle
    ],
)
def test_invalid_answers(text):
    assert kk_key(text, ["Zoey", "Oliver"]) is None


def test_answer_ids_kk_with_puzzle_text(inline):
    r = [[A("Zoey is a knave, Oliver is a knight"), A("oliver=knight|zoey=knave"), A("Zoey is a knight, Oliver is a knight"),
          "no answer tag", A("Zoey is a knave")]]
    ids, gold = answer_ids(r, "kk", [[False, True]], contexts=[QUIZ], clusterer=inline)
    assert ids.tolist() == [[0, 0, 1, -1, -1]]
    assert gold.tolist() == [0]


def test_kk_needs_contexts(inline):
    with pytest.raises(ValueError):
        answer_ids([[A("Zoey is a knave")]], "kk", clusterer=inline)


def test_gold_names_are_not_used(inline):
    # the gold mentions a different name set: names still come from the puzzle only
    r = [[A("Zoey is a knave, Oliver is a knight")]]
    _, gold = answer_ids(r, "kk", ["Zoey is a knave, Oliver is a knight, Max is a knave"], contexts=[QUIZ], clusterer=inline)
    assert gold.tolist() == [0]
    _, gold = answer_ids(r, "kk", ["Zoey is a knave"], contexts=[QUIZ], clusterer=inline)
    assert gold.tolist() == [-1]


@pytest.mark.parametrize("n", [3, 5, 8])
def test_staged_puzzles(data_dir, inline, n):
    rows = [json.loads(line) for line in open(data_dir / f"kk_test_people{n}_num100.jsonl")][:10]
    responses, golds, ctx = [], [], []
    for row in rows:
        names, sol = row["names"], row["solution"]
        sentence = ", ".join(f"{x} is a {'knight' if s else 'knave'}" for x, s in zip(names, sol))
        canon = "|".join(f"{x.lower()}={'knight' if s else 'knave'}" for x, s in sorted(zip(names, sol)))
        flipped = ", ".join(f"{x} is a {'knight' if (s if i else not s) else 'knave'}" for i, (x, s) in enumerate(zip(names, sol)))
        responses.append([A(row["solution_text_format"]), A(sentence), A(canon), A(row["solution_text"]), A(flipped)])
        golds.append(sol)
        ctx.append(row["quiz"])  # names are read from the puzzle text
    ids, gid = answer_ids(responses, "kk", golds, contexts=ctx, clusterer=inline)
    for row, g in zip(ids.tolist(), gid.tolist()):
        assert row == [0, 0, 0, 0, 1] and g == 0


def test_logic_rl_ground_truth_record(data_dir, inline):
    import pyarrow.parquet as pq

    row = pq.read_table(data_dir / "kk_logicrl_3ppl_test.parquet").to_pylist()[0]
    gt = row["reward_model"]["ground_truth"]
    r = [[A(gt["solution_text_format"])]]
    _, gold = answer_ids(r, "kk", [gt], contexts=[{"quiz": row["quiz"]}], clusterer=inline)
    assert gold.tolist() == [0]
