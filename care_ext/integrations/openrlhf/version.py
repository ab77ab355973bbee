"""The one OpenRLHF release this adapter is written against, and the check that enforces it.

The adapter overrides methods whose bodies, signatures and module layout change with every
OpenRLHF minor release (``make_experience``, ``compute_advantages_and_returns``,
``PolicyModelActor.forward``, the launcher's module attributes), so it refuses any other version
instead of failing somewhere in the middle of a multi-GPU job.
"""
from __future__ import annotations

import importlib.metadata

REQUIRED_OPENRLHF = "0.11.2"
"""Exact ``openrlhf`` version the adapter supports (``pip install openrlhf==0.11.2``)."""


class OpenRLHFVersionError(RuntimeError):
    """openrlhf is missing or is not the pinned release."""


def installed_openrlhf_version() -> str | None:
    """The installed ``openrlhf`` distribution version, or None when it is not installed."""
    try:
        return importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_openrlhf_version() -> str:
    """Return the installed openrlhf version; raise :class:`OpenRLHFVersionError` unless it is
    exactly :data:`REQUIRED_OPENRLHF`."""
    v = installed_openrlhf_version()
    if v is None:
        raise OpenRLHFVersionError(
            f"care_ext.integrations.openrlhf needs openrlhf=={REQUIRED_OPENRLHF}, which is not "
            f"installed: pip install 'openrlhf=={REQUIRED_OPENRLHF}' (see docs/openrlhf.md)")
    if v != REQUIRED_OPENRLHF:
        raise OpenRLHFVersionError(
            f"care_ext.integrations.openrlhf supports exactly openrlhf=={REQUIRED_OPENRLHF}, found "
            f"{v}. The hooks override methods whose bodies change between releases; install "
            f"openrlhf=={REQUIRED_OPENRLHF} (see docs/openrlhf.md).")
    return v
