"""Every benchmark's gold answers against their own variants (equivalent forms, near-misses)."""

import json
import random

import pytest

from care_ext.answers import answer_ids
from care_ext.answers.variants import boxed, equivalent_forms, garbage_responses, near_misses

MATH_SETS = ["math500", "aime24", "aime25", "amc23", "hmmt_feb_2025", "olympiadbench"]
PER_SET = 12


def _golds(data_dir, name):
    if name == "dapo17k":
        import pyarrow.parquet as pq

        col = pq.read_table(data_dir / "dapo17k.parquet", columns=["reward_model"]).column(0).to_pylist()
        return [r["ground_truth"] for r in col]
    with open(data_dir / f"{name}.jsonl") as f:
        return [json.loads(line)["answer"] for line in f if line.strip()]


@pytest.mark.parametrize("name", MATH_SETS + ["dapo17k"])
def test_gold_against_its_variants(data_dir, inline, name):
    golds = _golds(data_dir, name)
    rng = random.Random(hash(name) % 1000)
    # a fixed sample that always includes the non-integer answers of small sets
    sample = rng.sample(golds, min(PER_SET, len(golds)))
    checked = 0
    for gold in sample:
        eq = equivalent_forms(gold)
        nm = near_misses(gold, rng)
        gb = garbage_responses(gold, rng)
        responses = [boxed(a, rng) for a in eq + nm] + gb
        ids, gid = answer_ids([responses], "math", [gold], clusterer=inline)
        ids = ids[0].tolist()
        gid = gid.item()
        assert gid >= 0, (name, gold)
        for a, i in zip(eq, ids):
            assert i == gid, (name, gold, "equivalent form split off:", a)
        for a, i in zip(nm, ids[len(eq):]):
            assert i != gid, (name, gold, "near miss merged:", a)
        assert ids[len(eq) + len(nm):len(eq) + len(nm) + 3] == [-1, -1, -1]  # no box, truncated, empty
        checked += 1
    assert checked == len(sample)


def test_aime_zero_padded_golds_match_unpadded_answers(data_dir, inline):
    golds = [g for g in _golds(data_dir, "aime24") if g.startswith("0")]
    assert len(golds) >= 5
    r = [[boxed(g.lstrip("0")), boxed(g), boxed("0")] for g in golds]
    ids, gid = answer_ids(r, "math", golds, clusterer=inline)
    for row, g in zip(ids.tolist(), gid.tolist()):
        assert row[0] == row[1] == g and row[2] != g
