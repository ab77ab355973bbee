#!/usr/bin/env python3
"""Write OpenRLHF prompt JSONL files from the staged data in ../shared/data.

Every row: ``prompt`` (chat messages for math, a pre-rendered chat string for K&K), ``label`` (the
JSON label column of care_ext.integrations.openrlhf.labels: uid, gold answer, task, K&K names) and
``datasource`` (OpenRLHF's eval metrics group by it). Outputs in --out-dir:

    dapo17k_train.jsonl       DAPO-17k, 17,398 prompts      --data.input_key prompt --data.apply_chat_template
    kk_3to7_train.jsonl       K&K 3-7 people (Logic-RL), 4,500 prompts   --data.input_key prompt (no chat template)
    eval_math.jsonl           AIME24, AIME25, AMC23, HMMT25, MATH500, OlympiadBench (chat messages)
    eval_kk.jsonl             K&K test split, 3-8 people (same prompt rendering as the K&K train rows)

Math prompts use DAPO's own instruction ("Let's think step by step and output the final answer
within \\boxed{}." + blank line + problem) for training and evaluation alike.

Usage: python training/openrlhf/prepare_data.py --data-dir ../shared/data --out-dir data/openrlhf [--limit N]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq

from care_ext.integrations.openrlhf.labels import make_label

MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}.\n\n"
MATH_EVAL = {"aime24": "aime24.jsonl", "aime25": "aime25.jsonl", "amc23": "amc23.jsonl",
             "hmmt25": "hmmt_feb_2025.jsonl", "math500": "math500.jsonl",
             "olympiadbench": "olympiadbench.jsonl"}
KK_TRAIN_PEOPLE = (3, 4, 5, 6, 7)
KK_TEST_PEOPLE = (3, 4, 5, 6, 7, 8)


def _write(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _parquet_rows(path: Path, limit: int | None):
    t = pq.read_table(path)
    if limit is not None:
        t = t.slice(0, limit)
    return t.to_pylist()


def dapo_rows(data_dir: Path, limit: int | None = None):
    """DAPO-17k rows: the staged prompt (instruction + problem) as one user message; gold = the
    integer ground truth; uid ``dapo17k-<row>``."""
    for i, r in enumerate(_parquet_rows(data_dir / "dapo17k.parquet", limit)):
        yield {"prompt": [{"role": "user", "content": r["prompt"][0]["content"]}],
               "label": make_label(f"dapo17k-{i:05d}", str(r["reward_model"]["ground_truth"]), "math"),
               "datasource": "dapo17k"}


def kk_template(data_dir: Path) -> str:
    """The Logic-RL K&K prompt rendering with ``{quiz}`` in place of the puzzle (derived from the
    first 3-people train row, so train and test prompts render identically)."""
    r = _parquet_rows(data_dir / "kk_logicrl_3ppl_train.parquet", 1)[0]
    text = r["prompt"][0]["content"]
    if text.count(r["quiz"]) != 1:
        raise ValueError("cannot locate the quiz inside the K&K prompt rendering")
    return text.replace("{", "{{").replace("}", "}}").replace(r["quiz"].replace("{", "{{").replace("}", "}}"), "{quiz}")


def kk_train_rows(data_dir: Path, limit: int | None = None):
    """K&K 3-7 people train rows (Logic-RL's rendering); gold = ``solution`` (bools in name order)."""
    for n in KK_TRAIN_PEOPLE:
        for r in _parquet_rows(data_dir / f"kk_logicrl_{n}ppl_train.parquet", limit):
            yield {"prompt": r["prompt"][0]["content"],
                   "label": make_label(f"kk{n}-train-{r['index']}", list(r["solution"]), "kk", r["names"]),
                   "datasource": f"kk{n}ppl"}


def math_eval_rows(data_dir: Path, limit: int | None = None):
    for name, fname in MATH_EVAL.items():
        with open(data_dir / fname, encoding="utf-8") as f:
            for j, line in enumerate(f):
                if limit is not None and j >= limit:
                    break
                r = json.loads(line)
                yield {"prompt": [{"role": "user", "content": MATH_INSTRUCTION + r["problem"]}],
                       "label": make_label(f"{name}-{r['id']}", str(r["answer"]), "math"), "datasource": name}


def kk_eval_rows(data_dir: Path, limit: int | None = None):
    template = kk_template(data_dir)
    for n in KK_TEST_PEOPLE:
        with open(data_dir / f"kk_test_people{n}_num100.jsonl", encoding="utf-8") as f:
            for j, line in enumerate(f):
                if limit is not None and j >= limit:
                    break
                r = json.loads(line)
                yield {"prompt": template.format(quiz=r["quiz"]),
                       "label": make_label(f"kk{n}-test-{r['index']}", list(r["solution"]), "kk", r["names"]),
                       "datasource": f"kk{n}ppl"}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[3] / "shared" / "data"))
    p.add_argument("--out-dir", default="data/openrlhf")
    p.add_argument("--limit", type=int, default=None, help="rows per source file (smoke tests)")
    a = p.parse_args(argv)
    d, out = Path(a.data_dir), Path(a.out_dir)
    counts = {
        "dapo17k_train.jsonl": _write(out / "dapo17k_train.jsonl", dapo_rows(d, a.limit)),
        "kk_3to7_train.jsonl": _write(out / "kk_3to7_train.jsonl", kk_train_rows(d, a.limit)),
        "eval_math.jsonl": _write(out / "eval_math.jsonl", math_eval_rows(d, a.limit)),
        "eval_kk.jsonl": _write(out / "eval_kk.jsonl", kk_eval_rows(d, a.limit)),
    }
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main()
