"""care_ext: CARE active label acquisition for RL with verifiable rewards.

The compiled library ``care_ext._C`` registers the ops under ``torch.ops.care_ext``; the typed
public functions live in :mod:`care_ext.ops` and fall back to the pure-torch twins in
:mod:`care_ext.reference` where no native kernel exists.

Environment:
    CARE_EXT_REQUIRE_NATIVE=1   failing to load the native library is an error (CI, GPU checks).
    CARE_EXT_DISABLE_NATIVE=1   do not load it at all (everything runs on the reference).
"""
from __future__ import annotations

import json
import os
import warnings

__version__ = "0.1.0"

HAS_NATIVE = False
"""True when the compiled library loaded and its ops are registered."""
NATIVE_ERROR: str | None = None
"""Why the native library did not load (None when it did)."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _load_native() -> None:
    global HAS_NATIVE, NATIVE_ERROR
    if _env_flag("CARE_EXT_DISABLE_NATIVE"):
        if _env_flag("CARE_EXT_REQUIRE_NATIVE"):
            raise RuntimeError("CARE_EXT_REQUIRE_NATIVE=1 and CARE_EXT_DISABLE_NATIVE=1 contradict")
        NATIVE_ERROR = "disabled by CARE_EXT_DISABLE_NATIVE=1"
        return
    import torch  # noqa: F401  (loads libtorch before the extension)

    try:
        from . import _C  # noqa: F401
    except ImportError as exc:
        NATIVE_ERROR = f"{type(exc).__name__}: {exc}"
        here = os.path.dirname(os.path.abspath(__file__))
        if not any(f.startswith("_C") and f.endswith((".so", ".pyd")) for f in os.listdir(here)):
            NATIVE_ERROR = (f"no compiled library in {here}: this is probably the source tree "
                            "shadowing the installed package (run from another directory or use "
                            "the console scripts, or build in place with `python setup.py "
                            f"build_ext --inplace`) [{NATIVE_ERROR}]")
        if _env_flag("CARE_EXT_REQUIRE_NATIVE"):
            raise ImportError(
                "care_ext: the native library care_ext._C could not be loaded and "
                f"CARE_EXT_REQUIRE_NATIVE=1 ({NATIVE_ERROR}). Rebuild with "
                "`pip install --no-build-isolation .` against the installed torch.") from exc
        warnings.warn(
            f"care_ext: native library unavailable ({NATIVE_ERROR}); using the pure-torch "
            "reference ops (slower). Set CARE_EXT_REQUIRE_NATIVE=1 to make this an error.",
            RuntimeWarning, stacklevel=3)
        return
    HAS_NATIVE = True
    from . import _fake  # noqa: F401  (register_fake for torch.compile)


_load_native()


def build_info() -> dict:
    """What the native library was built with.

    Returns:
        dict with keys torch (version built against), cuda (bool), cuda_version, archs, git
        (``+dirty`` when built from uncommitted sources), sources (a hash of the library's source
        files as built, setup.py's ``_sources_hash``: the same sources give the same hash even
        where the build tree's git metadata lags), max_group_size, intra_op_parallel (the
        CPU kernels split their work over torch's intra-op threads: built with OpenMP),
        cpu_bf16_gemm (MKL's bf16 x bf16 -> float32 GEMM is reachable: the CPU split step's
        products), cpu_brgemm (oneDNN's bf16 BRGeMM on AMX for packed split pieces),
        cpu_f32_gemm ('avx2' or 'mkl': what ``CARE_EXT_CPU_GEMM=auto`` runs the CPU's float32
        first layers on from cpu_f32_gemm_min_hidden on), debug;
        or ``{"native": False, "error": ...}`` when it is not loaded.
    """
    if not HAS_NATIVE:
        return {"native": False, "error": NATIVE_ERROR}
    import torch

    info = json.loads(torch.ops.care_ext.build_info())
    info["native"] = True
    return info


from . import ops, reference  # noqa: E402
from .ops import (  # noqa: E402
    acquisition_step,
    cag,
    classifier_forward,
    classwise_cag,
    cluster_stats,
    expected_cag,
    group_advantage,
    group_features,
)

__all__ = [
    "HAS_NATIVE", "NATIVE_ERROR", "build_info", "ops", "reference", "acquisition_step", "cag",
    "classifier_forward", "classwise_cag", "cluster_stats", "expected_cag", "group_advantage",
    "group_features",
]
