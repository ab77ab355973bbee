"""Fixtures of the answers tests: repo root on sys.path, the data folder, shared clusterers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _data_dir() -> Path:
    return Path(os.environ.get("CARE_EXT_DATA_DIR", REPO / ".." / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = _data_dir()
    if not d.is_dir():
        pytest.fail(f"data directory {d} is missing: put the staged data there or set CARE_EXT_DATA_DIR")
    return d


@pytest.fixture(scope="session")
def inline():
    """Clusterer that runs the symbolic step in this process (pytest runs tests on the main thread)."""
    from care_ext.answers import AnswerClusterer

    c = AnswerClusterer(workers=0)
    yield c
    c.close()


@pytest.fixture(scope="session")
def pooled():
    """Clusterer with 2 worker processes (started once for the session)."""
    from care_ext.answers import AnswerClusterer

    c = AnswerClusterer(workers=2, job_timeout_s=30.0)
    c.start()
    assert len(c._pool._workers) == 2 and all(w.proc.is_alive() for w in c._pool._workers)
    yield c
    c.close()
