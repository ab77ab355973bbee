"""Core tests: make the synthetic-batch helpers (core_synth.py) importable; one torch thread.

Whether the native ops are required is the run's choice (CARE_EXT_REQUIRE_NATIVE, see tests/conftest.py).
"""
import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
