"""Monitors and tables of the report, on hand-made runs."""
import math

import torch

from training.lab.experiment import auc
from training.lab.report import classifier_table, results_table


def test_auc_by_hand():
    score = torch.tensor([0.9, 0.8, 0.3, 0.3, 0.1])
    pos = torch.tensor([True, False, True, False, False])
    # positive pairs: (0.9 vs 0.8, 0.3, 0.1) = 3 wins; (0.3 vs 0.8 lose, 0.3 tie, 0.1 win) = 1.5
    assert abs(auc(score, pos) - 4.5 / 6) < 1e-12
    assert math.isnan(auc(score, torch.ones(5, dtype=torch.bool)))


def _run(method, seed, finals, budgeted=True, steps=None):
    evals = [{"step": 0, "mean8": 0.5, "greedy": 0.4, "maj8": 0.6},
             {"step": 10, "mean8": finals, "greedy": finals, "maj8": finals}]
    steps = steps or [{"step": i + 1, "pseudo_acc": 0.5, "bought": 2} for i in range(10)]
    return {"spec": {"method": method, "seed": seed, "budget": 0.2}, "budgeted": budgeted,
            "evals": evals, "steps": steps, "labels_total": 20, "wall_s": 1.0}


def test_results_table_means_and_per_seed():
    md = results_table([_run("care", 0, 0.9), _run("care", 1, 0.7), _run("gt", 0, 1.0, budgeted=False)])
    row = next(line for line in md.splitlines() if line.startswith("| care @20%"))
    assert "| 2 |" in row and "0.800 ± 0.100" in row and "0.900 / 0.700" in row
    assert any(line.startswith("| gt |") for line in md.splitlines())


def test_classifier_table_windows_skip_nan():
    steps = [{"step": i + 1, "pseudo_acc": 0.5, "stage1_auc": (math.nan if i < 2 else float(i >= 5))}
             for i in range(10)]
    md = classifier_table([_run("care", 0, 0.9, steps=steps)], windows=2)
    row = next(line for line in md.splitlines() if "Stage-I AUC" in line)
    assert row.endswith("| 0.00 | 1.00 |")  # steps 1-5: NaN, NaN, 0, 0, 0; steps 6-10: all 1
