"""The public API gives the same answers with the native library disabled (reference fallback)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import care_ext

pytestmark = pytest.mark.native

SCRIPT = textwrap.dedent("""
    import sys, torch, warnings
    import care_ext
    assert not care_ext.HAS_NATIVE, "native library should be disabled"
    assert care_ext.build_info()["native"] is False
    assert not care_ext.ops.native_available("cpu")
    inputs = torch.load(sys.argv[1])
    out = {}
    ids, lengths, h_p, h_r, s1, s2, r = (inputs[k] for k in ("ids", "lengths", "h_p", "h_r", "s1", "s2", "r"))
    out["cluster"] = care_ext.cluster_stats(ids)
    out["adv"] = care_ext.group_advantage(r)
    out["cag"] = care_ext.cag(r, r.flip(1))
    out["classwise"] = care_ext.classwise_cag(out["cluster"][1])
    out["step"] = tuple(care_ext.acquisition_step(ids, lengths, h_p, h_r, s1, s2, max_len=500.0))
    torch.save(out, sys.argv[2])
""")


def test_fallback_matches_native(tmp_path):
    gen = torch.Generator().manual_seed(0)
    from ops_testutil import random_ids, random_rewards, random_weights
    B, G, H = 12, 8, 40
    inputs = dict(ids=random_ids(B, G, gen), lengths=torch.randint(1, 900, (B, G), generator=gen),
                  h_p=torch.randn(B, H, generator=gen), h_r=torch.randn(B, G, H, generator=gen),
                  s1=random_weights(H, G + 1, 1, 2, gen), s2=random_weights(H, G + 1, 0, G + 1, gen),
                  r=random_rewards(B, G, gen))
    torch.save(inputs, tmp_path / "in.pt")
    env = dict(os.environ, CARE_EXT_DISABLE_NATIVE="1", CARE_EXT_REQUIRE_NATIVE="0")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "in.pt"),
                           str(tmp_path / "out.pt")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    ref = torch.load(tmp_path / "out.pt")
    assert care_ext.ops.native_available("cpu")
    nat = dict(cluster=care_ext.cluster_stats(inputs["ids"]),
               adv=care_ext.group_advantage(inputs["r"]),
               cag=care_ext.cag(inputs["r"], inputs["r"].flip(1)))
    nat["classwise"] = care_ext.classwise_cag(nat["cluster"][1])
    nat["step"] = tuple(care_ext.acquisition_step(inputs["ids"], inputs["lengths"], inputs["h_p"],
                                                  inputs["h_r"], inputs["s1"], inputs["s2"],
                                                  max_len=500.0))
    for key in nat:
        got, want = nat[key], ref[key]
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        for g, w in zip(got, want, strict=True):
            if w.dtype in (torch.int64, torch.bool):
                assert torch.equal(g, w), key
            else:
                torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-4, atol=1e-5)


def test_missing_library_warns_and_require_native_raises(tmp_path):
    """A package whose _C cannot load warns and falls back; CARE_EXT_REQUIRE_NATIVE=1 raises."""
    import shutil
    pkg = tmp_path / "care_ext"
    shutil.copytree(os.path.dirname(care_ext.__file__), pkg,
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    (pkg / "_C.py").write_text("raise ImportError('libc10_cuda.so: cannot open shared object file')\n")
    code = ("import warnings, care_ext; print(care_ext.HAS_NATIVE); "
            "print(care_ext.cluster_stats(__import__('torch').tensor([[1, 1, -1]]))[1].tolist())")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), CARE_EXT_REQUIRE_NATIVE="0")
    env.pop("CARE_EXT_DISABLE_NATIVE", None)
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "[[2,", "0,", "0]]"]
    assert "native library unavailable" in proc.stderr and "libc10_cuda" in proc.stderr
    env["CARE_EXT_REQUIRE_NATIVE"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "CARE_EXT_REQUIRE_NATIVE=1" in proc.stderr


@pytest.mark.parametrize("native", [True, False], ids=["native", "fallback"])
def test_public_ops_ignore_an_enclosing_autocast(monkeypatch, native):
    """care_ext.acquisition_step / classifier_forward give the same bits inside a caller's
    torch.autocast as outside, on the native path and on the reference fallback (which without
    its autocast-off region ran its matmuls in bf16: 1e-3 to 1e-2 off in the logits)."""
    from ops_testutil import step_inputs

    if not native:
        monkeypatch.setattr(care_ext.ops, "_NATIVE_DEVICES", frozenset())
    assert care_ext.ops.native_available("cpu") is native
    gen = torch.Generator().manual_seed(3)
    B, G, H = 9, 8, 48
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(B, G, H, torch.bfloat16, gen)
    pf, mask = torch.rand(B, G + 1, generator=gen), torch.rand(B, G, generator=gen) > 0.5

    def both():
        return (*care_ext.acquisition_step(ids, lengths, h_p, h_r, s1, s2),
                care_ext.classifier_forward(h_p, pf, h_r, None, mask, s2))

    plain = both()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")
        mixed = both()
    for m, p in zip(mixed, plain, strict=True):
        assert m.dtype == p.dtype and torch.equal(m, p)
