"""Data preparation on the shared files: OpenRLHF JSONL with the JSON label column, and the
shipped reward function grading a correct answer against it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from care_ext.integrations.openrlhf.labels import parse_label
from care_ext.integrations.openrlhf.reward_func import grade

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    if not (DATA / "dapo17k.parquet").exists():
        pytest.skip(f"shared data not found at {DATA}")
    out = tmp_path_factory.mktemp("prep")
    r = subprocess.run([sys.executable, str(REPO / "training/openrlhf/prepare_data.py"), "--data-dir", str(DATA),
                        "--out-dir", str(out), "--limit", "5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, json.loads(r.stdout.strip().splitlines()[-1])


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_counts_and_uids(prepared):
    out, counts = prepared
    assert counts == {"dapo17k_train.jsonl": 5, "kk_3to7_train.jsonl": 25, "eval_math.jsonl": 30,
                      "eval_kk.jsonl": 30}
    for name in counts:
        rows = _rows(out / name)
        uids = [parse_label(r["label"], "").uid for r in rows]
        assert len(set(uids)) == len(uids)  # the label store's key is unique per prompt
        assert all(set(r) == {"prompt", "label", "datasource"} for r in rows)


def test_math_rows(prepared):
    out, _ = prepared
    d = _rows(out / "dapo17k_train.jsonl")[0]
    lab = parse_label(d["label"], "")
    assert lab.uid == "dapo17k-00000" and lab.answer == "34" and lab.task == "math"
    assert d["prompt"][0]["role"] == "user" and "\\boxed{}" in d["prompt"][0]["content"]
    assert grade("... so \\boxed{34}", d["label"]) == 1.0 and grade("\\boxed{35}", d["label"]) == 0.0
    ev = _rows(out / "eval_math.jsonl")
    assert {r["datasource"] for r in ev} == {"aime24", "aime25", "amc23", "hmmt25", "math500", "olympiadbench"}
    aime = [r for r in ev if r["datasource"] == "aime24"]
    assert all(r["prompt"][0]["content"].startswith("Let's think step by step") for r in aime)


def test_kk_rows(prepared):
    out, _ = prepared
    tr = _rows(out / "kk_3to7_train.jsonl")[0]
    lab = parse_label(tr["label"], "")
    assert lab.task == "kk" and lab.names == ("Michael", "Zoey", "Ethan") and lab.answer == [True, True, True]
    assert tr["prompt"].rstrip().endswith("<think>")
    good = "<answer> (1) Michael is a knight (2) Zoey is a knight (3) Ethan is a knight </answer>"
    assert grade(good, tr["label"]) == 1.0
    assert grade(good.replace("Ethan is a knight", "Ethan is a knave"), tr["label"]) == 0.0
    ev = _rows(out / "eval_kk.jsonl")
    assert {r["datasource"] for r in ev} == {f"kk{n}ppl" for n in range(3, 9)}
    e = ev[0]
    names = parse_label(e["label"], "").names
    assert all(n in e["prompt"] for n in names)
    # test prompts render exactly like the train prompts around the puzzle
    head = tr["prompt"].split("A very special island")[0]
    assert e["prompt"].startswith(head)


def test_eval_scoring_reads_the_same_files(prepared, tmp_path):
    out, _ = prepared
    rows = _rows(out / "eval_math.jsonl")[:2] + _rows(out / "eval_kk.jsonl")[:1]
    gold0 = parse_label(rows[0]["label"], "").answer
    gens = [dict(rows[0], responses=[f"\\boxed{{{gold0}}}", "\\boxed{-1}", "none", f"so \\boxed{{{gold0}}}"]),
            dict(rows[1], responses=["\\boxed{-1}"] * 4),
            dict(rows[2], responses=["<answer> nobody </answer>"] * 2)]
    g = tmp_path / "gens.jsonl"
    g.write_text("".join(json.dumps(r) + "\n" for r in gens))
    res_path = tmp_path / "res.json"
    r = subprocess.run([sys.executable, str(REPO / "training/openrlhf/eval_vllm.py"), "--generations", str(g),
                        "--out", str(res_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(res_path.read_text())
    assert res["aime24/avg@4"] == pytest.approx(0.25) and res["kk3ppl/avg@2"] == 0.0 and res["n_prompts"] == 3
