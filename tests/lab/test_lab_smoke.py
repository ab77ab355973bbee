"""The smoke preset end to end: SFT (tiny), every strategy for 3 steps, report, CSV and PNGs."""
import csv
import time

from training.lab.__main__ import main
from training.lab.strategies import available_methods


def test_smoke_preset_end_to_end(tmp_path):
    t0 = time.time()
    out = tmp_path / "out"
    rc = main(["smoke", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    elapsed = time.time() - t0
    assert rc == 0
    assert elapsed < 120, f"smoke preset took {elapsed:.0f} s (limit 120 s)"
    md = (out / "results.md").read_text()
    for method in available_methods():
        assert f"| {method}" in md, f"{method} missing from the results table"
    for png in ("accuracy.png", "pseudo_label.png", "budget.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    rows = list(csv.DictReader(open(out / "steps.csv")))
    assert len(rows) == 3 * len(list((out / "runs").iterdir()))
    assert {r["method"] for r in rows} == set(available_methods())
    # labels: GT buys every prompt, TTRL none
    gt = [r for r in rows if r["method"] == "gt"]
    assert all(int(r["bought"]) == 16 for r in gt)
    assert all(int(r["bought"]) == 0 for r in rows if r["method"] == "ttrl")
    # a second invocation reuses the SFT checkpoint and the finished runs (resumable)
    t1 = time.time()
    assert main(["smoke", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    assert time.time() - t1 < 0.5 * elapsed + 5
