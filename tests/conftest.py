"""Shared pytest setup for care_ext.

- ``CARE_EXT_REQUIRE_NATIVE=1`` (CI, GPU checks): the native library must load; tests marked
  ``native`` then never skip, so the reference is never silently tested against itself.
- ``cuda``-marked tests skip without a CUDA device or without a CUDA build of care_ext.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

import care_ext

REQUIRE_NATIVE = os.environ.get("CARE_EXT_REQUIRE_NATIVE", "0") == "1"
CUDA_OK = (care_ext.HAS_NATIVE and bool(care_ext.build_info().get("cuda"))
           and torch.cuda.is_available())


def pytest_configure(config):
    if REQUIRE_NATIVE and not care_ext.HAS_NATIVE:
        raise pytest.UsageError(f"CARE_EXT_REQUIRE_NATIVE=1 but care_ext._C is not loaded: "
                                f"{care_ext.NATIVE_ERROR}")


def pytest_collection_modifyitems(config, items):
    skip_native = pytest.mark.skip(reason=f"native library not loaded ({care_ext.NATIVE_ERROR})")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device and a CUDA build of care_ext")
    for item in items:
        if "native" in item.keywords and not care_ext.HAS_NATIVE:
            item.add_marker(skip_native)
        if "cuda" in item.keywords and not CUDA_OK:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    yield


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device with native kernels: cpu always, cuda when available."""
    return request.param
