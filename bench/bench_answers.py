"""Benchmark of care_ext.answers against an official-code-style greedy clusterer, same run.

Groups of G responses are built from the gold answers in the staged data (six math evaluation
sets and a sample of DAPO-17k), with realistic variants (care_ext.answers.variants): equivalent
forms, near-misses and garbage. Measured, on the same groups:

* ours, per-group latency: one group per call, symbolic work in the worker pool;
* ours, throughput: whole batches of B groups per call (one training step);
  "cold" = fresh clusterer and fresh workers (started with their warm-up, plus one dummy group,
  before the clock starts; empty verdict cache); "warm" = the same groups again (cross-step verdict cache, worker parse caches);
* comparison ("official style", written here from the description in
  shared/design/notes/care_official_code.md §2a): responses in order, each joins the first
  cluster whose first member it "grades" equal to (equal stripped strings, or math-verify
  verify(parse(a), parse(b)) in either direction, parsing inside every call, as the official
  grader does), one process, math-verify's own 1 s signal timeouts; the gold is graded against
  each cluster's first member.

Usage: python bench/bench_answers.py [--groups-per-set N] [--groups-per-set-64 M] [--workers W]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from care_ext.answers import AnswerClusterer  # noqa: E402
from care_ext.answers.extract import last_braced_command  # noqa: E402
from care_ext.answers.variants import boxed, equivalent_forms, garbage_responses, near_misses  # noqa: E402

MATH_SETS = ["math500", "aime24", "aime25", "amc23", "hmmt_feb_2025", "olympiadbench"]


def data_dir() -> Path:
    d = Path(os.environ.get("CARE_EXT_DATA_DIR", ROOT / ".." / "shared" / "data")).resolve()
    if not d.is_dir():
        raise SystemExit(f"data directory {d} not found (set CARE_EXT_DATA_DIR)")
    return d


def load_golds(d: Path, dapo_n: int, seed: int) -> dict[str, list[str]]:
    out = {}
    for name in MATH_SETS:
        with open(d / f"{name}.jsonl") as f:
            out[name] = [json.loads(line)["answer"] for line in f if line.strip()]
    import pyarrow.parquet as pq

    dapo = [r["ground_truth"] for r in pq.read_table(d / "dapo17k.parquet", columns=["reward_model"]).column(0).to_pylist()]
    out["dapo17k"] = random.Random(seed).sample(dapo, dapo_n)
    return out


def make_group(gold: str, G: int, rng: random.Random) -> list[str]:
    eq = equivalent_forms(gold)
    nm = near_misses(gold, rng) or [gold + "+1"]
    gb = garbage_responses(gold, rng)
    # a group has one "popular" form plus a few others, like real samples
    group = []
    main = rng.choice(eq[:2])
    for _ in range(G):
        u = rng.random()
        if u < 0.35:
            group.append(boxed(main, rng))
        elif u < 0.6:
            group.append(boxed(rng.choice(eq), rng))
        elif u < 0.85:
            group.append(boxed(rng.choice(nm), rng))
        else:
            group.append(rng.choice(gb))
    return group


# ---------------------------------------------------------------- comparison implementation
def _grade(a: str, b: str) -> bool:
    from math_verify import parse, verify

    pa = parse("\\boxed{" + a + "}", parsing_timeout=1)
    pb = parse("\\boxed{" + b + "}", parsing_timeout=1)
    if not pa or not pb:
        return False
    return bool(verify(pa, pb, timeout_seconds=1))


def _official_equivalent(a: str, b: str) -> bool:
    return a.strip() == b.strip() or _grade(a, b) or _grade(b, a)


def official_style(responses: list[str], gold: str | None) -> tuple[list[int], int]:
    answers = [last_braced_command(r) or None for r in responses]
    reps: list[str] = []
    ids = [-1] * len(responses)
    for i, a in enumerate(answers):
        if a is None:
            continue
        for c, ra in enumerate(reps):
            if _official_equivalent(ra, a):
                ids[i] = c
                break
        else:
            reps.append(a)
            ids[i] = len(reps) - 1
    gid = -1
    if gold is not None:
        for c, ra in enumerate(reps):
            if _official_equivalent(ra, gold):
                gid = c
                break
    return ids, gid


# ------------------------------------------------------------------------------ measuring
def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarise(name: str, lat_s: list[float], total_s: float, n_groups: int) -> dict:
    return {
        "name": name,
        "groups": n_groups,
        "median_ms": statistics.median(lat_s) * 1e3 if lat_s else float("nan"),
        "p95_ms": pct(lat_s, 0.95) * 1e3 if lat_s else float("nan"),
        "mean_ms": statistics.fmean(lat_s) * 1e3 if lat_s else float("nan"),
        "groups_per_s": n_groups / total_s if total_s > 0 else float("inf"),
    }


WARM = [["\\boxed{\\frac{\\sqrt{2}}{2}}", "\\boxed{x+1}", "\\boxed{(1,2)}", "\\boxed{3\\pi}"]]


def _fresh(workers: int) -> AnswerClusterer:
    cl = AnswerClusterer(workers=workers)
    cl.start()  # start every worker and wait for its warm-up, outside the timings
    cl(WARM, "math", ["1"])
    cl.clear_cache()
    return cl


def _timed(cl: AnswerClusterer, groups, batch: int) -> tuple[list[float], float]:
    lat = []
    t0 = time.perf_counter()
    for s in range(0, len(groups), batch):
        chunk = groups[s : s + batch]
        t = time.perf_counter()
        cl([g[1] for g in chunk], "math", [g[2] for g in chunk])
        dt = time.perf_counter() - t
        lat += [dt / len(chunk)] * len(chunk)
    return lat, time.perf_counter() - t0


def run(G: int, groups: list[tuple[str, list[str], str]], workers: int, batch: int, n_official: int) -> list[dict]:
    rows = []
    # comparison first, in this process, on the first n_official groups, after the same warm-up
    sub = groups[:n_official]
    for r in WARM:
        official_style(r, "1")
    lat = []
    t0 = time.perf_counter()
    for _, resp, gold in sub:
        t = time.perf_counter()
        official_style(resp, gold)
        lat.append(time.perf_counter() - t)
    official = summarise("official-style greedy pairwise grading, 1 process", lat, time.perf_counter() - t0, len(sub))

    # ours, one group per call: fresh workers and caches; the comparison subset comes first
    cl = _fresh(workers)
    lat, total = _timed(cl, groups, 1)
    rows.append(summarise(f"ours, 1 group/call, {workers} workers, cold", lat, total, len(groups)))
    same = summarise("ours on the comparison's groups (first of the cold pass above)", lat[:n_official], sum(lat[:n_official]), n_official)
    lat, total = _timed(cl, groups, 1)
    rows.append(summarise(f"ours, 1 group/call, {workers} workers, warm (2nd pass)", lat, total, len(groups)))
    cl.close()

    # ours, whole batches (one training step per call): fresh workers and caches
    cl = _fresh(workers)
    lat, total = _timed(cl, groups, batch)
    rows.append(summarise(f"ours, batches of {batch} groups, cold", lat, total, len(groups)))
    lat, total = _timed(cl, groups, batch)
    rows.append(summarise(f"ours, batches of {batch} groups, warm (2nd pass)", lat, total, len(groups)))
    cl.close()
    return rows + [official, same]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups-per-set", type=int, default=60, help="groups of 8 per data set")
    ap.add_argument("--groups-per-set-64", type=int, default=10, help="groups of 64 per data set")
    ap.add_argument("--official-per-set", type=int, default=20, help="groups of 8 per set also run by the comparison")
    ap.add_argument("--official-per-set-64", type=int, default=2, help="groups of 64 per set also run by the comparison")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    golds = load_golds(data_dir(), dapo_n=2000, seed=args.seed)
    rng = random.Random(args.seed)
    for G, per_set, off_per_set, batch in (
        (8, args.groups_per_set, args.official_per_set, 64),
        (64, args.groups_per_set_64, args.official_per_set_64, 8),
    ):
        groups, official_first = [], []
        for name, gs in golds.items():
            pick = rng.sample(gs, min(per_set, len(gs)))
            made = [(name, make_group(g, G, rng), g) for g in pick]
            official_first += made[:off_per_set]
            groups += made[off_per_set:]
        groups = official_first + groups  # the comparison runs on the first len(official_first)
        print(f"\n## G = {G}: {len(groups)} groups ({per_set} per set from {len(golds)} sets), comparison on {len(official_first)}")
        rows = run(G, groups, args.workers, batch, len(official_first))
        print("| implementation | groups | median ms/group | p95 ms/group | mean ms/group | groups/s |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['groups']} | {r['median_ms']:.3f} | {r['p95_ms']:.3f} | {r['mean_ms']:.3f} | {r['groups_per_s']:.1f} |")
        off, same = rows[-2], rows[-1]
        print(
            f"speed-up on the same {off['groups']} groups (one group per call, both cold): "
            f"median {off['median_ms'] / same['median_ms']:.1f}x, mean {off['mean_ms'] / same['mean_ms']:.1f}x, "
            f"throughput {same['groups_per_s'] / off['groups_per_s']:.1f}x"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
