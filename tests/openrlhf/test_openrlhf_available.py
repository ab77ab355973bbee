"""Reports (as one skipped test with the reason) when the OpenRLHF adapter tests cannot run;
otherwise checks the pinned version check itself. Imports nothing from OpenRLHF at module level."""
import pytest


def test_openrlhf_pinned_version_present():
    import importlib.metadata

    try:
        found = importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("openrlhf is not installed: the OpenRLHF adapter tests are skipped "
                    "(pip install -r requirements-openrlhf.txt && pip install --no-deps openrlhf==0.11.2)")
    if found != "0.11.2":
        pytest.skip(f"openrlhf {found} installed; the OpenRLHF adapter tests need exactly 0.11.2")
    from care_ext.integrations.openrlhf.version import REQUIRED_OPENRLHF, check_openrlhf_version

    assert check_openrlhf_version() == REQUIRED_OPENRLHF == "0.11.2"


def test_version_mismatch_message(monkeypatch):
    import care_ext.integrations.openrlhf.version as v

    monkeypatch.setattr(v, "installed_openrlhf_version", lambda: "0.11.0")
    with pytest.raises(v.OpenRLHFVersionError, match="exactly openrlhf==0.11.2, found 0.11.0"):
        v.check_openrlhf_version()
    monkeypatch.setattr(v, "installed_openrlhf_version", lambda: None)
    with pytest.raises(v.OpenRLHFVersionError, match="not installed"):
        v.check_openrlhf_version()
