"""setup.py's build hash: the commit in build_info() and in every benchmark row, marked ``+dirty``
when the library's sources differ from it (a number measured on uncommitted kernels says so)."""
from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[2] / "setup.py"

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git_hash_function():
    """setup.py's ``_git_hash`` compiled on its own (importing setup.py would run setup())."""
    tree = ast.parse(SETUP.read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_git_hash")
    namespace: dict = {"subprocess": subprocess}
    code = compile(ast.Module(body=[fn], type_ignores=[]), str(SETUP), "exec")
    exec(code, namespace)  # noqa: S102 -- our own setup.py's function, nothing from outside
    return namespace["_git_hash"]


def _git(repo: Path, *args: str) -> str:
    return subprocess.check_output(["git", "-C", str(repo), *args], text=True).strip()


def test_build_hash_marks_changed_sources(tmp_path):
    repo = tmp_path / "repo"
    (repo / "csrc").mkdir(parents=True)
    (repo / "csrc" / "k.cpp").write_text("int k;\n")
    (repo / "README.md").write_text("readme\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    git_hash = _git_hash_function()
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
