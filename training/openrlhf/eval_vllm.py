#!/usr/bin/env python3
"""Evaluate a checkpoint with vLLM on the files prepare_data.py writes (UNTESTED ON GPUs).

avg@k accuracy per datasource: k = 32 for AIME24/25, AMC23, HMMT25; 8 for MATH500 and
OlympiadBench; 8 for K&K 3-8 people (--kk-samples); temperature 0.6, top-p 0.95, max 4000 new
tokens. Grading: care_ext.integrations.openrlhf.reward_func.grade (canonical answer keys: last
\\boxed{} for math, role assignment for K&K) against the label column's gold.

    python training/openrlhf/eval_vllm.py --model runs/.../final --data data/openrlhf/eval_math.jsonl \
        --out runs/.../eval_math.json [--tp 1]

``--generations FILE`` scores previously saved generations (JSONL rows with datasource, label,
responses) without vLLM; the CPU tests use that path.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

from care_ext.integrations.openrlhf.reward_func import grade

SAMPLES = {"aime24": 32, "aime25": 32, "amc23": 32, "hmmt25": 32, "math500": 8, "olympiadbench": 8}
KK_DEFAULT = 8


def samples_for(datasource: str, kk_samples: int = KK_DEFAULT) -> int:
    """k of avg@k for a datasource (K&K sources ``kk{N}ppl`` use ``kk_samples``)."""
    return SAMPLES.get(datasource, kk_samples if datasource.startswith("kk") else 8)


def score(rows) -> dict:
    """rows: dicts with datasource, label, responses (k strings) -> {datasource: avg@k, ...}."""
    acc = defaultdict(list)
    for r in rows:
        g = [grade(resp, r["label"]) for resp in r["responses"]]
        acc[r["datasource"]].append(sum(g) / max(1, len(g)))
    out = {f"{ds}/avg@{len(rows_k)}": sum(v) / len(v) for ds, v in acc.items()
           for rows_k in [next(x["responses"] for x in rows if x["datasource"] == ds)]}
    out["n_prompts"] = sum(len(v) for v in acc.values())
    return out


def generate(model: str, rows, tp: int, kk_samples: int, max_new_tokens: int, seed: int):
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(model)
    llm = LLM(model=model, tensor_parallel_size=tp, seed=seed)
    texts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
             if isinstance(r["prompt"], list) else r["prompt"] for r in rows]
    params = [SamplingParams(n=samples_for(r["datasource"], kk_samples), temperature=0.6, top_p=0.95,
                             max_tokens=max_new_tokens, seed=seed) for r in rows]
    outs = llm.generate(texts, params)
    return [{**r, "responses": [c.text for c in o.outputs]} for r, o in zip(rows, outs)]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model")
    p.add_argument("--data", help="eval JSONL from prepare_data.py")
    p.add_argument("--generations", help="score saved generations instead of generating")
    p.add_argument("--out", required=True)
    p.add_argument("--save-generations")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--kk-samples", type=int, default=KK_DEFAULT)
    p.add_argument("--max-new-tokens", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.generations:
        rows = [json.loads(line) for line in open(a.generations, encoding="utf-8")]
    else:
        rows = [json.loads(line) for line in open(a.data, encoding="utf-8")]
        rows = generate(a.model, rows, a.tp, a.kk_samples, a.max_new_tokens, a.seed)
        if a.save_generations:
            with open(a.save_generations, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
    res = score(rows)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2, sort_keys=True)
    print(json.dumps(res, sort_keys=True))
    return res


if __name__ == "__main__":
    main()
