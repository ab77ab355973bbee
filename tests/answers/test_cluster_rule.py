"""The clustering rule: order invariance, non-transitive families, integers, gold mapping."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from care_ext.answers import answer_ids
from care_ext.answers.cluster import KeyClass, merge_key_classes
from care_ext.answers.keys import CanonicalKey

B = "\\boxed{%s}"

# 10% verifies equal to both 10 and 0.1 in math-verify, which differ: a non-transitive family,
# next to equal-form families and garbage
FAMILY = [B % "10\\%", B % "10", B % "0.1", B % "\\frac{1}{10}", B % "010", B % "\\frac{\\sqrt{3}}{2}",
          B % "\\frac{1}{2}\\sqrt{3}", B % "x=5", B % "5", "no box", B % "none", B % "None"]


def _partition(ids):
    groups = {}
    for i, v in enumerate(ids):
        if v >= 0:
            groups.setdefault(v, set()).add(i)
    return sorted(map(sorted, groups.values()))


def test_family_clusters(inline):
    ids, gold = answer_ids([FAMILY], "math", ["0.1"], clusterer=inline)
    ids = ids[0].tolist()
    assert ids[9] == -1  # no box
    assert ids[1] == ids[4]  # 10 = 010 (digit string)
    assert ids[2] == ids[3]  # 0.1 = 1/10 (key)
    assert ids[1] != ids[2]  # two distinct numbers never share a cluster
    assert ids[5] == ids[6]  # sqrt(3)/2 in two forms (math-verify)
    assert ids[7] == ids[8]  # x=5 and 5
    assert ids[10] == ids[11]  # word answers, case-insensitive
    assert ids[0] in (ids[1], ids[2])  # 10% joins exactly one of its two neighbours
    assert gold.tolist() == [ids[2]]


@settings(max_examples=25, deadline=None)
@given(st.permutations(list(range(len(FAMILY)))))
def test_permutation_invariance(inline, perm):
    base, gbase = answer_ids([FAMILY], "math", ["10"], clusterer=inline)
    shuffled = [FAMILY[p] for p in perm]
    ids, gold = answer_ids([shuffled], "math", ["10"], clusterer=inline)
    # ids are equivariant, not just the partition: response perm[i] keeps its id
    assert ids[0].tolist() == [base[0, p].item() for p in perm]
    assert gold.tolist() == gbase.tolist()


def test_dtypes_shapes_and_ids_ordered_by_size(inline):
    r = [[B % "3", B % "4", B % "4", "x"], [B % "7", B % "7", B % "7", B % "07"]]
    ids, gold = answer_ids(r, "math", ["4", None], clusterer=inline)
    assert ids.dtype == torch.int64 and gold.dtype == torch.int64
    assert ids.shape == (2, 4) and gold.shape == (2,)
    assert ids.tolist() == [[1, 0, 0, -1], [0, 0, 0, 0]]
    assert gold.tolist() == [0, -1]


def test_gold_none_and_unmatched_gold(inline):
    r = [[B % "3", B % "4"]]
    assert answer_ids(r, "math", clusterer=inline)[1].tolist() == [-1]
    assert answer_ids(r, "math", ["5"], clusterer=inline)[1].tolist() == [-1]
    # both clusters have size 1: ids by key text, "3" -> 0, "4" -> 1; the gold 8/2 has key "4"
    assert answer_ids(r, "math", ["\\frac{8}{2}"], clusterer=inline)[1].tolist() == [1]


def test_gold_maps_through_symbolic_equivalence(inline):
    r = [[B % "\\frac{\\sqrt{2}}{2}", B % "\\frac{1}{\\sqrt{2}}", B % "1"]]
    ids, gold = answer_ids(r, "math", ["\\sqrt{2}/2"], clusterer=inline)
    assert ids[0, 0] == ids[0, 1] and gold.item() == ids[0, 0].item()


def test_never_two_distinct_integers_in_a_cluster_even_if_equal_says_so():
    # an adversarial equivalence that calls everything equal: integers must still stay apart
    def k(t, number):
        return CanonicalKey(t, number=number, symbolic=True, latex=t)

    classes = [KeyClass(k("a", False), (0, 1, 2)), KeyClass(k("1", True), (3,)), KeyClass(k("2", True), (4,)),
               KeyClass(k("b", False), (5,))]
    clusters = merge_key_classes(classes, lambda a, b: True)
    assert clusters == [[0, 1, 3], [2]]


def test_random_batches_are_order_invariant(inline):
    rng = random.Random(0)
    pool = [B % a for a in ["1", "01", "2", "\\frac{4}{2}", "0.5", "\\frac12", "x+1", "1+x", "(1,2)", "\\left(1,2\\right)"]] + ["none"]
    for _ in range(10):
        g = [rng.choice(pool) for _ in range(8)]
        perm = list(range(8))
        rng.shuffle(perm)
        a = answer_ids([g], "math", clusterer=inline)[0][0].tolist()
        b = answer_ids([[g[p] for p in perm]], "math", clusterer=inline)[0][0].tolist()
        assert b == [a[p] for p in perm]


def test_ragged_and_wrong_lengths_raise(inline):
    with pytest.raises(ValueError):
        answer_ids([["a", "b"], ["c"]], "math", clusterer=inline)
    with pytest.raises(ValueError):
        answer_ids([["a"]], "math", ["1", "2"], clusterer=inline)
    with pytest.raises(KeyError):
        answer_ids([["a"]], "no-such-task", clusterer=inline)


def test_empty_batch(inline):
    ids, gold = answer_ids([], "math", clusterer=inline)
    assert ids.shape == (0, 0) and gold.shape == (0,)


def test_flat_list_of_strings_is_rejected(inline):
    # two 9-character responses passed without the group level: read as B=2 groups of G=9
    # characters, they gave a [2, 9] tensor of -1 instead of an error
    flat = [B % "1", B % "2"]
    with pytest.raises(ValueError, match="groups"):
        answer_ids(flat, "math", clusterer=inline)
    with pytest.raises(ValueError, match="groups"):
        answer_ids(B % "1", "math", clusterer=inline)


def test_gold_as_one_string_is_rejected(inline):
    # gold "42" for B=2 was read as the golds "4" and "2"
    r = [[B % "4"], [B % "2"]]
    with pytest.raises(ValueError, match="length-B"):
        answer_ids(r, "math", "42", clusterer=inline)
