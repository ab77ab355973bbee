"""OpenRLHF adapter tests: real OpenRLHF 0.11.2 classes on the CPU.

The whole folder is skipped when openrlhf==0.11.2 (and its CPU-installable dependencies) is not
installed; docs/openrlhf.md gives the install commands. The only stand-ins are for the ``vllm``
and ``flash_attn`` imports (``standins/``, as OpenRLHF's own test suite does); they go on
``sys.path`` here and on ``PYTHONPATH`` for subprocesses and Ray workers.
"""
import importlib.metadata
import os
import sys
from pathlib import Path

import pytest

STANDINS = str(Path(__file__).resolve().parent / "standins")
HELPERS = str(Path(__file__).resolve().parent / "helpers")


def _why_skip():
    try:
        v = importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        return "openrlhf is not installed (pip install openrlhf==0.11.2 --no-deps; see docs/openrlhf.md)"
    if v != "0.11.2":
        return f"openrlhf {v} installed; these tests need exactly 0.11.2"
    for mod in ("ray", "deepspeed", "transformers", "peft", "datasets"):
        try:
            importlib.metadata.version(mod)
        except importlib.metadata.PackageNotFoundError:
            return f"{mod} (an OpenRLHF dependency) is not installed; see docs/openrlhf.md"
    return None


_SKIP = _why_skip()
if _SKIP is None:
    for p in (STANDINS, HELPERS):
        if p not in sys.path:
            sys.path.insert(0, p)
    os.environ["PYTHONPATH"] = os.pathsep.join([STANDINS, HELPERS] + [x for x in os.environ.get("PYTHONPATH", "").split(os.pathsep) if x])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def skip_reason():
    """Why the OpenRLHF tests are skipped (None when they run)."""
    return _SKIP


def pytest_report_header(config):
    return f"openrlhf adapter tests: {'SKIPPED - ' + _SKIP if _SKIP else 'openrlhf 0.11.2 found'}"


def pytest_collection_modifyitems(config, items):
    if _SKIP is None:
        return
    here = str(Path(__file__).resolve().parent)
    mark = pytest.mark.skip(reason=_SKIP)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(mark)


def pytest_ignore_collect(collection_path, config):
    # test modules import openrlhf at module level: do not even import them without it
    if (_SKIP is not None and collection_path.name.startswith("test_openrlhf_")
            and collection_path.name != "test_openrlhf_available.py"):
        return True
    return None
