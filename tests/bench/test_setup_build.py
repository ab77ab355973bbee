"""setup.py's helpers, compiled alone from its source (importing setup.py would run setup()): the
build hash (the commit in build_info() and in every benchmark row, marked ``+dirty`` when the
library's sources differ from it), the sources' own hash and the OpenMP flags (at::parallel_for
is serial without them)."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SETUP = Path(__file__).resolve().parents[2] / "setup.py"



def _setup_function(name: str):
    """setup.py's function ``name`` compiled on its own, with the modules setup.py imports."""
    tree = ast.parse(SETUP.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace: dict = {"subprocess": subprocess, "os": os, "sys": sys, "torch": torch,
                       "Path": Path}
    code = compile(ast.Module(body=[fn], type_ignores=[]), str(SETUP), "exec")
    exec(code, namespace)  # noqa: S102 -- our own setup.py's function, nothing from outside
    return namespace[name]


def _git(repo: Path, *args: str) -> str:
    return subprocess.check_output(["git", "-C", str(repo), *args], text=True).strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_build_hash_marks_changed_sources(tmp_path):
    repo = tmp_path / "repo"
    (repo / "csrc").mkdir(parents=True)
    (repo / "csrc" / "k.cpp").write_text("int k;\n")
    (repo / "README.md").write_text("readme\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    git_hash = _setup_function("_git_hash")
    head = _git(repo, "rev-parse", "--short=12", "HEAD")

    fn_globals = git_hash.__globals__
    fn_globals["ROOT"] = repo
    assert git_hash() == head
    (repo / "README.md").write_text("changed\n")  # not a library source
    assert git_hash() == head
    (repo / "csrc" / "k.cpp").write_text("int k2;\n")
    assert git_hash() == head + "+dirty"
    _git(repo, "add", "csrc/k.cpp")  # staged but not committed: still not the commit's sources
    assert git_hash() == head + "+dirty"
    fn_globals["ROOT"] = tmp_path / "not-a-repo"
    (tmp_path / "not-a-repo").mkdir()
    assert git_hash() == "unknown"


def test_sources_hash_follows_the_library_sources_only(tmp_path):
    """build_info()'s ``sources``: a hash of csrc/ (.cpp .h .cu .cuh, any depth), setup.py and
    CMakeLists.txt as they are on disk, git or not."""
    for rel, text in (("csrc/a.cpp", "int a;\n"), ("csrc/cuda/k.cu", "__global__ void k() {}\n"),
                      ("csrc/x.h", "#pragma once\n"), ("setup.py", "# setup\n"),
                      ("CMakeLists.txt", "project(x)\n"), ("README.md", "readme\n")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    sources_hash = _setup_function("_sources_hash")
    tree = ast.parse(SETUP.read_text())
    globs = next(n for n in tree.body if isinstance(n, ast.Assign)
                 and getattr(n.targets[0], "id", "") == "SOURCE_GLOBS")
    sources_hash.__globals__.update(ROOT=tmp_path, glob=__import__("glob"),
                                    SOURCE_GLOBS=ast.literal_eval(globs.value))
    h0 = sources_hash()
    assert len(h0) == 12 and int(h0, 16) >= 0
    (tmp_path / "README.md").write_text("changed\n")  # not a library source
    assert sources_hash() == h0
    (tmp_path / "csrc" / "cuda" / "k.cu").write_text("__global__ void k2() {}\n")
    h1 = sources_hash()
    assert h1 != h0
    (tmp_path / "csrc" / "cuda" / "k.cu").rename(tmp_path / "csrc" / "cuda" / "k2.cu")
    assert sources_hash() != h1  # a renamed file is another tree
    (tmp_path / "csrc" / "cuda" / "k2.cu").rename(tmp_path / "csrc" / "cuda" / "k.cu")
    assert sources_hash() == h1
    (tmp_path / "CMakeLists.txt").write_text("project(y)\n")
    assert sources_hash() != h1


def test_installed_build_info_names_its_sources():
    import care_ext

    if not care_ext.HAS_NATIVE:
        pytest.skip("native library not loaded")
    got = care_ext.build_info()["sources"]
    assert len(got) == 12 and int(got, 16) >= 0


@pytest.mark.skipif(not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
                    reason="torch's intra-op backend here is not OpenMP")
def test_openmp_flags_follow_the_compiler(monkeypatch, capsys):
    """-fopenmp when the compiler links it; a compiler that cannot (here: none at all) gives a
    warning and no flag, so the build goes on serial instead of failing; CARE_EXT_OPENMP=0 too."""
    flags = _setup_function("_openmp_flags")
    monkeypatch.delenv("CARE_EXT_OPENMP", raising=False)
    if shutil.which(os.environ.get("CXX", "c++")):
        assert flags() == ["-fopenmp"]
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert flags() == []
    assert "cannot build with -fopenmp" in capsys.readouterr().err
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("CARE_EXT_OPENMP", "0")
    assert flags() == []
