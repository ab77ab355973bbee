"""The CPU miniature's answers: the digits between the last '#' and the first end mark '$'."""

import pytest

from care_ext.answers import answer_ids
from care_ext.answers.arith import extract_arith_answer


@pytest.mark.parametrize(
    "resp,ans",
    [("1,4,2#2$", "2"), ("7,1,5#5$", "5"), ("1,4,2#2$7#3$", "2"), ("3#07$", "07"), ("1,2#3", None),
     ("1,2,3$", None), ("1,2#$", None), ("1,2#x$", None), ("1,2#-3$", None), ("#٣$", None)],
)
def test_extract(resp, ans):
    assert extract_arith_answer(resp) == ans


def test_extract_without_required_end_mark():
    assert extract_arith_answer("1,2#3", require_end_mark=False) == "3"


def test_answer_ids_arith(inline):
    r = [["1,4,2#2$", "0,0,2#02$", "5#5$", "garbage", "1,1#5$"]]
    ids, gold = answer_ids(r, "arith", [5], clusterer=inline)
    # two clusters of size 2: ids by key text, "2" before "5"
    assert ids.tolist() == [[0, 0, 1, -1, 1]]
    assert gold.item() == ids[0, 2].item()
    assert answer_ids(r, "arith", ["2"], clusterer=inline)[1].item() == ids[0, 0].item()
    assert answer_ids(r, "arith", [9], clusterer=inline)[1].item() == -1
