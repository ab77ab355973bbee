"""Build of care_ext: `pip install --no-build-isolation .` (torch must already be installed).

Environment switches:
    CARE_EXT_CUDA=auto|0|1   (alias FORCE_CUDA) build the CUDA kernels: auto = when the installed
                             torch has CUDA and a CUDA toolkit is found; 1 = must, 0 = never.
    CARE_EXT_SKIP_BUILD=1    no native extension at all (pure-Python install; the reference serves).
    DEBUG=1                  -O0 -g instead of -O3.
    CARE_EXT_PTXAS_VERBOSE=1 pass -Xptxas -v to nvcc (register/spill report per kernel).
    CARE_EXT_OPENMP=0        build the CPU kernels without OpenMP (they then run on one thread).
    TORCH_CUDA_ARCH_LIST     defaults to "9.0" (H100/H200/H20).
    CUDA_HOME                defaults to the toolkit root that `nvcc` on PATH resolves to.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _toolkit_root() -> str | None:
    """The CUDA toolkit root: nvcc on PATH may be a wrapper script that `exec`s the real one."""
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    real = Path(nvcc).resolve()
    try:
        text = real.read_text(errors="ignore")[:4096] if real.stat().st_size < 65536 else ""
    except OSError:
        text = ""
    m = re.search(r"(/\S+)/bin/nvcc", text)
    if m and Path(m.group(1), "include", "cuda_runtime.h").exists():
        return m.group(1)
    root = real.parent.parent
    return str(root) if (root / "include" / "cuda_runtime.h").exists() else None


if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    _root = _toolkit_root()
    if _root:
        os.environ["CUDA_HOME"] = _root  # before importing cpp_extension, which reads it at import
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

try:
    import torch
    from torch.utils import cpp_extension as cpp_ext
except ImportError as exc:  # pragma: no cover - exercised by users, not tests
    sys.exit(
        "care_ext needs torch installed before it is built: `pip install torch==2.13.0` (CPU) or use "
        "the CUDA build you run, then `pip install --no-build-isolation .`\n(" + str(exc) + ")"
    )


def _git_hash() -> str:
    """The commit the kernels are built from (12 hex digits), with ``+dirty`` when the sources that
    go into the library (csrc/, setup.py, CMakeLists.txt) differ from it: build_info() and every
    benchmark row carry it, and a number measured on uncommitted kernels must say so."""
    try:
        head = subprocess.check_output(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "csrc", "setup.py",
                            "CMakeLists.txt"], cwd=ROOT, stderr=subprocess.DEVNULL, check=False)
    return head + ("+dirty" if dirty.returncode == 1 else "")


SOURCE_GLOBS = ("csrc/**/*.cpp", "csrc/**/*.h", "csrc/**/*.cu", "csrc/**/*.cuh", "setup.py",
                "CMakeLists.txt")
"""The files whose contents make up the library (what :func:`_sources_hash` reads)."""


def _sources_hash() -> str:
    """SHA-256 (first 12 hex digits) of the library's sources as they are on disk: every file of
    SOURCE_GLOBS, path and contents, in path order. build_info() carries it as ``sources`` beside
    the git hash, which names a commit only as far as the build tree's git metadata is current:
    on the GPU machine, whose copy of the tree lagged in its .git, a build of 048820b's sources
    said ``56f4afd89228+dirty`` (2026-11-28). Equal hashes: the same sources, whatever git says."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted({f for g in SOURCE_GLOBS for f in glob.glob(str(ROOT / g), recursive=True)})
    for f in files:
        digest.update(os.path.relpath(f, ROOT).encode() + b"\0")
        digest.update(Path(f).read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _openmp_flags() -> list[str]:
    """``-fopenmp`` where torch's intra-op backend is OpenMP (Linux wheels). ``at::parallel_for`` is
    an inline template that runs its body on the calling thread unless the file that includes it is
    compiled with OpenMP (ATen defines INTRA_OP_PARALLEL from ``_OPENMP``): without the flag every
    CPU kernel of ours ran on one thread whatever ``torch.set_num_threads`` said (found 2026-11-27;
    ``build_info()["intra_op_parallel"]`` reports it). Linking with it adds ``libgomp.so.1``, which
    resolves to the copy torch has already loaded: one OpenMP runtime, one thread count.
    ``CARE_EXT_OPENMP=0`` leaves it out; a compiler that cannot link it gets a warning and a
    serial build, not a failed one."""
    if (os.environ.get("CARE_EXT_OPENMP", "1") == "0" or not sys.platform.startswith("linux")
            or not torch.backends.openmp.is_available()):
        return []
    import tempfile

    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "omp.cpp"
        src.write_text("#include <omp.h>\n"
                       "int main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            ok = subprocess.run([cxx, "-fopenmp", str(src), "-o", str(Path(tmp) / "omp")],
                                capture_output=True, check=False).returncode == 0
        except OSError:
            ok = False
    if not ok:
        print(f"care_ext: {cxx} cannot build with -fopenmp; the CPU kernels will run on one thread "
              "(build_info()['intra_op_parallel'] is False)", file=sys.stderr)
        return []
    return ["-fopenmp"]


def _extensions():
    if os.environ.get("CARE_EXT_SKIP_BUILD", "0") == "1":
        return []
    flag = os.environ.get("CARE_EXT_CUDA", os.environ.get("FORCE_CUDA", "auto")).lower()
    possible = torch.version.cuda is not None and cpp_ext.CUDA_HOME is not None
    if flag == "auto":
        use_cuda = possible
    elif flag in ("1", "true", "yes", "on"):
        if not possible:
            raise RuntimeError(
                f"CARE_EXT_CUDA={flag} but CUDA cannot be built: torch.version.cuda="
                f"{torch.version.cuda!r}, CUDA_HOME={cpp_ext.CUDA_HOME!r}")
        use_cuda = True
    elif flag in ("0", "false", "no", "off"):
        use_cuda = False
    else:
        raise RuntimeError(f"CARE_EXT_CUDA must be auto, 0 or 1, got {flag!r}")

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    archs = os.environ["TORCH_CUDA_ARCH_LIST"] if use_cuda else ""
    defines = [
        f'-DCARE_EXT_TORCH_VERSION="{torch.__version__}"',
        f'-DCARE_EXT_GIT_HASH="{_git_hash()}"',
        f'-DCARE_EXT_SOURCES_HASH="{_sources_hash()}"',
        f'-DCARE_EXT_CUDA_ARCHS="{archs}"',
        f'-DCARE_EXT_CUDA_VERSION="{torch.version.cuda or ""}"',
    ]
    # Link the shared libstdc++ explicitly, ahead of any static copy a toolchain's specs add: the GPU
    # machine's /opt/gcc g++ linked libstdc++ statically into _C, whose uninitialised stream
    # locale then crashed every TORCH_CHECK message with a number in it (seen 2026-11-26).
    omp = _openmp_flags()
    link = ["-l:libstdc++.so.6"] if sys.platform.startswith("linux") else []
    link += omp
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = opt + defines + ["-Wall", "-Wextra", "-Wno-unused-parameter"] + omp
    if not use_cuda:
        return [cpp_ext.CppExtension("care_ext._C", sources, extra_compile_args={"cxx": cxx},
                                     extra_link_args=link, py_limited_api=True)]
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = opt + defines + ["-lineinfo", "-DCARE_EXT_WITH_CUDA"]
    if os.environ.get("CARE_EXT_PTXAS_VERBOSE", "0") == "1":
        nvcc += ["-Xptxas", "-v"]  # registers, stack and spills per kernel (bench/gpu_check.sh)
    return [cpp_ext.CUDAExtension("care_ext._C", sources,
                                  extra_compile_args={"cxx": cxx + ["-DCARE_EXT_WITH_CUDA"],
                                                      "nvcc": nvcc},
                                  extra_link_args=link, py_limited_api=True)]


setup(
    name="care_ext",
    version="0.1.0",
    description="CARE active label acquisition for RL with verifiable rewards: fused C++/CUDA ops",
    packages=find_packages(include=["care_ext", "care_ext.*", "training", "training.*"]),
    package_data={"care_ext": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.10", "numpy", "math-verify[antlr4_13_2]>=0.9.0,<0.10", "matplotlib",
                      "tqdm"],
    extras_require={
        # GPU machines: openrlhf pulls flash-attn, which needs CUDA to install. On a CPU machine use
        # requirements-openrlhf.txt plus `pip install --no-deps openrlhf==0.11.2` (scripts/test.sh).
        "openrlhf": ["openrlhf==0.11.2", "ray[default]==2.55.0", "deepspeed==0.19.6",
                     "transformers==5.15.0"],
    },
    entry_points={"console_scripts": [
        "care-openrlhf = care_ext.integrations.openrlhf.__main__:main",
        "care-lab = training.lab.__main__:main",
    ]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_ext.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
