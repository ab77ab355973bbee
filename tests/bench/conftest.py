"""Benchmark tests: the scripts in bench/ import as modules (bench_ops, bench_step, plot_bench, ...)."""
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(autouse=True)
def _bench_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
