"""Core tests: make the synthetic-batch helpers (core_synth.py) importable, require native ops."""
import os
import sys

import torch

os.environ.setdefault("CARE_EXT_REQUIRE_NATIVE", "1")
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))
