"""What the CUDA kernels compiled to, read from the SASS of a built extension and checked against
what the source means: registers and local memory per kernel, the instruction mix per kernel and
per hot loop (tagged ``// sass: <name>`` in csrc/), and rules that fail when the code generation
is not what the source was written for.

    python bench/sass_report.py --so $(python -c "import care_ext._C as m; print(m.__file__)") --check
    python bench/sass_report.py --wheel build/cuda-wheel/care_ext-*.whl --check --out build/sass

Needs no GPU: ``cuobjdump`` extracts the cubins of the extension, ``nvdisasm -gi`` disassembles them
with the source line of every instruction (the build passes ``-lineinfo``). Both come with the CUDA
toolkit, or from PyPI (``pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm``, ~6 MB; found in
site-packages when not on PATH). CI runs it on the sm_90 wheel it compiles; bench/gpu_check.sh on
the GPU machine's build.

Rules (``--check``; exit status 1 when one fails):

- ``no-local-memory``: no kernel has a stack frame, local memory or LDL/STL instructions (spilled
  registers or per-thread arrays that did not stay in registers).
- ``tail-fp32``: the fused step's tail kernel does no FP64 arithmetic in step_tail.h or
  step_fused.cu (a stray double literal in a float loop). group_math.h's per-row statistics are
  FP64 on purpose (the reference twin's sums) and run once per prompt.
- ``l2-tile``: the loop body of rollout layer 2 (``sass: l2-fma``) keeps its kL2TileRows x
  kL2TileUnits tile in registers and loads kL2Steps steps of weights before using them: at least
  kL2Steps * kL2TileRows * kL2TileUnits FFMAs in one basic block and at most one load per
  kL2TileRows FFMAs for its weights plus one per 4 * kL2TileUnits FFMAs for its rollouts (read as
  float4: LDS.128), global and shared loads counted together: the weights come from global
  memory (LDG), or from shared memory where the tail stages them (CARE_EXT_TAIL_STAGE_R2; the
  body checked is the one with the most FFMAs of the tagged line). Constants from step_tail.h.
- ``l2-mma``: the tensor-core layer 2 (``sass: l2-mma``, CARE_EXT_TAIL_L2=mma) compiled to TF32
  HMMA instructions, at least 3 * kMmaUnitTiles in one basic block (one step of 8 k for all of a
  warp's unit tiles, three products each, unrolled).
- ``dot-loads-ahead``: the head's dot products (``sass: dot-fma``) issue kDotChunk global loads
  before their first FFMA (loads in flight, not one latency per multiply-add).
- ``head-shared-weights``: the split head's layer 1 (step_head_kernel, CARE_EXT_TAIL_HEAD=split;
  ``sass: head-fma``) takes its weights from shared memory, where cp.async staged them chunks
  ahead: a whole chunk for kHeadSub prompts unrolled (at least kHeadSub * kDotChunk FFMAs), no
  global load, at most one shared load per 2 FFMAs (a weight per kHeadSub FFMAs, a float4 of
  inputs per 4). The version of 2026-11-28 that loaded the next chunk's weights from global memory
  during this chunk's FFMAs (the rule then: head-loads-ahead) took 55.8 us at 64 x 8 on the H200.
- The loop rules apply to every kernel that must hold the loop (expected_loops): each
  instantiation of step_tail_kernel, except that one built with its head split off
  (``step_tail_kernel<M, true, ...>``) has no dot products, and step_head_kernel has only its
  shared-memory ones (the loop "head-fma"; address-arithmetic counts it too).
- ``address-arithmetic``: those loop bodies spend at most INT_PER_FFMA integer instructions
  (DOT_AHEAD_INT_PER_FFMA for the dot products of ``step_tail_kernel<M, false, true>``)
  per FFMA (address computation: a pointer stepped along each weight row costs one add per load;
  recomputing ``r * rs + c * cs`` in 64 bits for every weight cost 2.8 per FFMA in layer 2).
- ``warp-clustering``: the clustering kernels (cluster_stats, group_features) are warp-cooperative
  (SHFL instructions), as common.cuh's cluster_row_warp is written.

Printed and written (``--out``: DIR/sass_report.json and DIR/sass_report.txt): per kernel the
registers, shared memory, instruction classes (global loads by width, shared, FP32, FP64, integer,
tensor-core), and per tagged loop its body's mix, including integer instructions per FFMA (the
address arithmetic a loop pays for).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"

# Integer instructions per FFMA a tagged loop body may spend (rule address-arithmetic). Measured
# with nvcc 13.0 for sm_90 (2026-11-26): l2-fma 0.84 with stepped pointers (2.84 before), dot-fma
# 1.25 (2.22 before; one pointer add per weight, one weight per FFMA).
INT_PER_FFMA = {"l2-fma": 1.0, "dot-fma": 1.5, "head-fma": 1.5}
# The same cap for the dot products of a tail built with them software-pipelined
# (step_tail_kernel<M, false, true>, CARE_EXT_TAIL_DOT_AHEAD): with the next chunk's loads between
# this chunk's FFMAs nvcc steps each weight address by a 64-bit add (IADD3 + IADD3.X) where the
# plain loop uses one IMAD.WIDE: 2.156 per FFMA measured (nvcc 13.0, sm_90, 2026-11-28) against
# 1.25; still under the 2.8 of recomputed 64-bit offsets this rule was written against.
DOT_AHEAD_INT_PER_FFMA = 2.5

# The tagged source line each loop's rules look at: the head kernel's pipelined dot products
# (head-fma) have a line of their own (head_chunk_fmas).
LOOP_MARKER = {"l2-fma": "l2-fma", "dot-fma": "dot-fma", "head-fma": "head-fma", "l2-mma": "l2-mma"}


@dataclass
class Instr:
    """One SASS instruction: address, opcode with modifiers (``LDG.E.128``), operands, the
    innermost source location (file name without directory, line; ``None`` without line info),
    and ``label`` set on pseudo-entries that mark a branch target (a basic-block start)."""

    addr: int
    op: str
    operands: str = ""
    loc: tuple[str, int] | None = None
    label: bool = False


@dataclass
class Kernel:
    """One ``__global__`` function of a cubin: mangled and readable name, resource usage
    (``cuobjdump -res-usage``: REG, STACK, SHARED, LOCAL, ...) and its instructions in order."""

    mangled: str
    name: str
    cubin: str
    resources: dict[str, int] = field(default_factory=dict)
    instrs: list[Instr] = field(default_factory=list)


# --- tools -----------------------------------------------------------------------------------

def find_tool(name: str, explicit: str | None = None) -> str:
    """Path of a CUDA binary utility (``cuobjdump``, ``nvdisasm``): ``explicit`` if given, else
    PATH, else $CUDA_HOME/bin, else the PyPI wheels' ``nvidia/cu*/bin`` or ``nvidia/cuda_*/bin``
    in this Python's site-packages. Raises FileNotFoundError saying how to get it."""
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise FileNotFoundError(f"--{name} {explicit}: not an executable file")
        return explicit
    found = shutil.which(name)
    if found:
        return found
    cands = []
    if os.environ.get("CUDA_HOME"):
        cands.append(Path(os.environ["CUDA_HOME"]) / "bin" / name)
    for key in ("purelib", "platlib"):
        nv = Path(sysconfig.get_paths()[key]) / "nvidia"
        cands += sorted(nv.glob(f"*/bin/{name}"))
    for c in cands:
        if os.access(c, os.X_OK):
            return str(c)
    raise FileNotFoundError(
        f"{name} not found on PATH, in $CUDA_HOME/bin or in site-packages/nvidia/*/bin: install the "
        f"CUDA toolkit or `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`, or pass --{name}")


def _run(cmd: list[str], cwd: str | None = None) -> str:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[:2000]}")
    return res.stdout


def extract_cubins(binary: Path, workdir: Path, cuobjdump: str) -> list[Path]:
    """The device code (ELF cubins) embedded in a host shared library, written into ``workdir``.
    Raises ValueError when the library carries none (a CPU-only build)."""
    _run([cuobjdump, "-xelf", "all", str(binary.resolve())], cwd=str(workdir))
    cubins = sorted(workdir.glob("*.cubin"))
    if not cubins:
        raise ValueError(f"{binary}: no cubin inside (a CPU-only build? build with CARE_EXT_CUDA=1)")
    return cubins


def so_from_wheel(wheel: Path, workdir: Path) -> Path:
    """The extension library ``care_ext/_C*.so`` of a built wheel, unpacked into ``workdir``."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if re.fullmatch(r"care_ext/_C[^/]*\.so", n)]
        if len(names) != 1:
            raise ValueError(f"{wheel}: expected one care_ext/_C*.so, found {names}")
        return Path(z.extract(names[0], workdir))


def binary_cubins(cubins: list[Path] | None, so: Path | None, wheel: Path | None, workdir: Path,
                  cuobjdump: str) -> list[Path]:
    """The cubins to read: ``cubins`` when given, else those of the library ``so`` or of the
    wheel's (unpacked into ``workdir``, which must outlive their use)."""
    if cubins:
        return cubins
    return extract_cubins(so_from_wheel(wheel, workdir) if wheel else so, workdir, cuobjdump)


# --- parsing ---------------------------------------------------------------------------------

_RES_FN = re.compile(r"^\s*Function\s+(\S+?):?\s*$")
_RES_KV = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump -res-usage`` output -> {mangled kernel: {"REG": 80, "STACK": 0, ...}}."""
    out: dict[str, dict[str, int]] = {}
    cur = None
    for line in text.splitlines():
        m = _RES_FN.match(line)
        if m:
            cur = m.group(1)
            continue
        if cur is not None and "REG:" in line:
            out[cur] = {k: int(v) for k, v in _RES_KV.findall(line)}
            cur = None
    return out


_SECTION = re.compile(r"^\s*\.section\s+\.text\.(\S+?),")
_FILE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')
_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:\{\s*)?(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*([$.\w]+):\s*$")


def parse_disasm(text: str) -> dict[str, list[Instr]]:
    """``nvdisasm -c -gi`` output -> {mangled kernel: instructions}. Each instruction carries the
    innermost source location of the ``//## File`` comments above it (for inlined code the first
    comment of a run is the inlined function's line, the next ones its callers'); branch targets
    appear as ``label`` entries. Runtime routines the compiler appends (``$__internal_...``: division
    slow paths) are attributed to their own name, line 0."""
    kernels: dict[str, list[Instr]] = {}
    cur: list[Instr] | None = None
    loc = None
    in_comment_run = False
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            cur = kernels.setdefault(m.group(1), [])
            loc, in_comment_run = None, False
            continue
        if cur is None:
            continue
        m = _FILE.match(line)
        if m:
            if not in_comment_run:
                loc = (Path(m.group(1)).name, int(m.group(2)))
            in_comment_run = True
            continue
        in_comment_run = False
        m = _INSTR.match(line)
        if m:
            cur.append(Instr(int(m.group(1), 16), m.group(3), m.group(4).strip(), loc))
            continue
        m = _LABEL.match(line)
        if m:
            if not m.group(1).startswith(".L_x_") and m.group(1) not in kernels:
                # an out-of-line runtime routine (division slow paths, ...) at the section's end:
                # no line info of its own, so it must not inherit the kernel's last line
                loc = (m.group(1), 0)
            cur.append(Instr(-1, m.group(1), label=True))
    return kernels


def readable_name(mangled: str) -> str:
    """The unqualified function name of a mangled kernel (``step_tail_kernel``), template
    arguments kept (``cag_kernel<float>``); c++filt when present, else the mangled name."""
    filt = shutil.which("c++filt")
    if not filt:
        return mangled
    full = _run([filt, mangled]).strip().replace("(anonymous namespace)::", "")
    depth, end = 0, len(full)
    for i, ch in enumerate(full):  # the name ends at the first "(" outside template brackets
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            end = i
            break
    base = full[:end]
    cut = base.find("<") if "<" in base else len(base)
    start = max(base.rfind("::", 0, cut) + 2, base.rfind(" ", 0, cut) + 1)
    return base[start:]


def sass_markers(root: Path = CSRC) -> dict[str, tuple[str, int]]:
    """Tagged source lines: {name: (file name, line)} for every ``// sass: <name>`` comment under
    ``root``. Raises ValueError when a name is used twice (the rules need one line each)."""
    out: dict[str, tuple[str, int]] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".h", ".cuh", ".cu", ".cpp"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            m = re.search(r"//\s*sass:\s*([\w-]+)", line)
            if m:
                if m.group(1) in out:
                    raise ValueError(f"sass marker {m.group(1)!r} appears twice ({out[m.group(1)]}, "
                                     f"{(path.name, i)})")
                out[m.group(1)] = (path.name, i)
    return out


def source_constants(path: Path = CSRC / "step_tail.h") -> dict[str, int]:
    """The ``constexpr int kName = value;`` constants of a source file (the tile sizes the rules
    check against)."""
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"constexpr\s+int\s+(k\w+)\s*=\s*(\d+)\s*;", path.read_text())}


# --- classification --------------------------------------------------------------------------

_INT_OPS = ("IMAD", "IADD", "LEA", "SHF", "LOP", "VIADD", "IABS", "IMNMX", "VIMNMX", "SEL", "PRMT",
            "SGXT", "POPC", "FLO", "BREV", "IMUL", "ISCADD", "MOV", "ISETP")


def op_class(op: str) -> str:
    """The class of an opcode: global-load / global-store / shared-load / shared-store / local /
    const-load / fp32 / fp64 / tensor / int / shuffle / control / other."""
    head = op.split(".")[0]
    if head in ("LDL", "STL"):
        return "local"
    if head in ("LDG", "LD") or head.startswith("LDG"):
        return "global-load"
    if head in ("STG", "ST", "RED", "ATOMG", "ATOM"):
        return "global-store"
    if head in ("LDS", "LDSM"):
        return "shared-load"
    if head in ("STS", "ATOMS"):
        return "shared-store"
    if head in ("LDC", "ULDC"):
        return "const-load"
    if head in ("HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA", "QGMMA", "BMMA"):
        return "tensor"
    if head in ("DFMA", "DADD", "DMUL", "DSETP", "DMNMX") or op.startswith(("MUFU.RCP64", "MUFU.RSQ64")) \
            or (head in ("F2F", "I2F", "F2I") and ".F64" in op):
        return "fp64"
    if head in ("FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "MUFU", "FCHK", "FSWZADD"):
        return "fp32"
    if head.startswith("SHFL"):
        return "shuffle"
    if head in ("BRA", "BSSY", "BSYNC", "EXIT", "RET", "CALL", "BAR", "WARPSYNC", "NOP", "BMOV",
                "JMP", "BRX"):
        return "control"
    if head.startswith("U") and head[1:].startswith(_INT_OPS):
        return "int"
    if head.startswith(_INT_OPS):
        return "int"
    return "other"


def load_width(op: str) -> int:
    """Bits per thread of a load/store opcode: LDG.E.128 -> 128, LDG.E.64 -> 64, LDG.E.U16 -> 16,
    LDG.E.U8 -> 8, LDG.E / LDS -> 32."""
    for bits in (128, 64, 16, 8):
        if re.search(rf"\.(?:[SU])?{bits}\b", op):
            return bits
    return 32


def mix(instrs: list[Instr]) -> dict[str, int]:
    """Counts per class (op_class) and, for global loads, per width (``global-load-128`` ...)."""
    c: collections.Counter[str] = collections.Counter()
    for ins in instrs:
        if ins.label:
            continue
        k = op_class(ins.op)
        c[k] += 1
        if k in ("global-load", "shared-load"):
            c[f"{k}-{load_width(ins.op)}"] += 1
        if ins.op.split(".")[0] == "FFMA":
            c["FFMA"] += 1
    return dict(sorted(c.items()))


def basic_blocks(instrs: list[Instr]) -> list[list[Instr]]:
    """Straight-line runs of instructions: a new block starts at each branch target (label) and
    after each control transfer (BRA, EXIT, RET, CALL, BRX, JMP)."""
    blocks: list[list[Instr]] = [[]]
    for ins in instrs:
        if ins.label:
            blocks.append([])
            continue
        blocks[-1].append(ins)
        if ins.op.split(".")[0] in ("BRA", "EXIT", "RET", "CALL", "BRX", "JMP"):
            blocks.append([])
    return [b for b in blocks if b]


def hot_block(instrs: list[Instr], loc: tuple[str, int], op: str = "FFMA") -> list[Instr]:
    """The basic block with the most ``op`` instructions from source line ``loc`` (a tagged loop's
    unrolled body); empty when the line produced none."""
    best: list[Instr] = []
    best_n = 0
    for b in basic_blocks(instrs):
        n = sum(1 for i in b if i.loc == loc and i.op.split(".")[0] == op)
        if n > best_n:
            best, best_n = b, n
    return best


def loop_stats(block: list[Instr], loc: tuple[str, int]) -> dict[str, float]:
    """What a hot loop body costs: its instruction mix, the FFMAs of the tagged line, global loads
    issued before the first of them, and integer instructions per tagged FFMA."""
    m = mix(block)
    tagged = sum(1 for i in block if i.loc == loc and i.op.split(".")[0] == "FFMA")
    first = next((k for k, i in enumerate(block) if i.loc == loc and i.op.startswith("FFMA")), 0)
    ahead = sum(1 for i in block[:first] if op_class(i.op) == "global-load")
    out: dict[str, float] = {"instructions": len(block), "tagged_ffma": tagged,
                             "global_loads_before_first_ffma": ahead}
    out.update(m)
    out["int_per_ffma"] = round(m.get("int", 0) / tagged, 3) if tagged else float("nan")
    return out


# --- the report and its rules ----------------------------------------------------------------

def load_kernels(cubins: list[Path], cuobjdump: str, nvdisasm: str) -> list[Kernel]:
    """Every kernel of the given cubins, with resources and instructions. Raises ValueError when
    they hold none."""
    kernels = []
    for cubin in cubins:
        res = parse_res_usage(_run([cuobjdump, "-res-usage", str(cubin)]))
        code = parse_disasm(_run([nvdisasm, "-c", "-gi", str(cubin)]))
        for mangled, instrs in code.items():
            kernels.append(Kernel(mangled, readable_name(mangled), cubin.name,
                                  res.get(mangled, {}), instrs))
    if not kernels:
        raise ValueError(f"{[str(c) for c in cubins]}: no kernel inside")
    return kernels


@dataclass
class Rule:
    name: str
    ok: bool
    detail: str


def _named(kernels: list[Kernel], stem: str) -> list[Kernel]:
    return [k for k in kernels if k.name.split("<")[0] == stem]


LOOP_RULES = ("tail-fp32", "l2-tile", "dot-loads-ahead", "l2-mma", "head-shared-weights",
              "address-arithmetic")
"""The rules checked per kernel of the fused step (its tail's instantiations, and the head kernel
of CARE_EXT_TAIL_HEAD=split), in report order."""


def _template_args(name: str) -> list[str]:
    """The template arguments of a readable kernel name, without spaces
    (``step_tail_kernel<1, false, true>`` -> ['1', 'false', 'true']; none: [])."""
    _, _, rest = name.replace(" ", "").partition("<")
    return rest.rstrip(">").split(",") if rest else []


def expected_loops(name: str) -> set[str]:
    """The tagged loops a kernel of the fused step must contain: step_head_kernel head layer 1's
    multiply-adds on weights in shared memory (head-fma) only; a tail instantiated with its
    head split off (``step_tail_kernel<M, true, ...>``: the second template argument) the rollout
    layers only; any other tail (``<M, false>``, ``<M, false, kAhead>``) all three of its own."""
    if name.split("<")[0] == "step_head_kernel":
        return {"head-fma"}
    args = _template_args(name)
    if name.split("<")[0] == "step_tail_kernel" and args[1:2] == ["true"]:
        return {"l2-fma", "l2-mma"}
    return {"l2-fma", "dot-fma", "l2-mma"}


def _tail_rules(tail: Kernel, markers: dict[str, tuple[str, int]],
                consts: dict[str, int]) -> list[Rule]:
    """The rules on one kernel of the fused step (see check_rules): tail-fp32 always, the loop
    rules for the loops it must contain (expected_loops)."""
    loops = expected_loops(tail.name)
    rules = []
    own = {"step_tail.h", "step_fused.cu"}
    fp64 = collections.Counter(f"{i.loc[0]}:{i.loc[1]}" for i in tail.instrs
                               if not i.label and op_class(i.op) == "fp64" and i.loc and i.loc[0] in own)
    rules.append(Rule("tail-fp32", not fp64,
                      f"FP64 instructions at {dict(fp64)}" if fp64 else
                      "no FP64 instruction from step_tail.h or step_fused.cu"))

    rows, units, steps = consts["kL2TileRows"], consts["kL2TileUnits"], consts["kL2Steps"]
    loc = markers.get("l2-fma")
    if "l2-fma" not in loops:
        pass
    elif loc is None:
        rules.append(Rule("l2-tile", False, "no `// sass: l2-fma` marker in csrc/"))
    else:
        s = loop_stats(hot_block(tail.instrs, loc), loc)
        f = s["tagged_ffma"]
        want = steps * rows * units
        loads = s.get("global-load", 0) + s.get("shared-load", 0)
        cap = f // rows + f // (4 * units)
        ok = f >= want and loads <= cap
        rules.append(Rule("l2-tile", ok,
                          f"body: {f} FFMA (want >= {want}), {s.get('global-load', 0)} global + "
                          f"{s.get('shared-load', 0)} shared loads (<= FFMA/{rows} + "
                          f"FFMA/{4 * units} = {cap}), "
                          f"{s.get('int', 0)} integer ({s['int_per_ffma']} per FFMA)"))
    # the head's dot products in the tail: a chunk's loads all issued before its first FFMA
    if "dot-fma" in loops:
        loc = markers.get("dot-fma")
        if loc is None:
            rules.append(Rule("dot-loads-ahead", False, "no `// sass: dot-fma` marker in csrc/"))
        else:
            s = loop_stats(hot_block(tail.instrs, loc), loc)
            k, n = consts["kDotChunk"], s.get("global_loads_before_first_ffma", 0)
            rules.append(Rule("dot-loads-ahead", s["tagged_ffma"] >= k and n >= k,
                              f"body: {s['tagged_ffma']} FFMA, {n} global loads before the first "
                              f"(want >= {k})"))
    # head layer 1 in the head kernel: weights from shared memory, a whole chunk unrolled
    if "head-fma" in loops:
        loc = markers.get("head-fma")
        if loc is None:
            rules.append(Rule("head-shared-weights", False,
                              "no `// sass: head-fma` marker in csrc/"))
        else:
            s = loop_stats(hot_block(tail.instrs, loc), loc)
            f, want = s["tagged_ffma"], consts["kHeadSub"] * consts["kDotChunk"]
            glob, shared = s.get("global-load", 0), s.get("shared-load", 0)
            ok = f >= want and glob == 0 and 0 < shared <= f // 2
            rules.append(Rule("head-shared-weights", ok,
                              f"body: {f} FFMA (want >= {want}), {glob} global loads (want 0), "
                              f"{shared} shared loads (want 1 .. FFMA/2 = {f // 2})"))

    loc = markers.get("l2-mma")
    if "l2-mma" not in loops:
        pass
    elif loc is None:
        rules.append(Rule("l2-mma", False, "no `// sass: l2-mma` marker in csrc/"))
    else:
        body = hot_block(tail.instrs, loc, op="HMMA")
        mmas = [i.op for i in body if i.loc == loc and i.op.startswith("HMMA")]
        want = 3 * consts["kMmaUnitTiles"]
        ok = len(mmas) >= want and all(".TF32" in op for op in mmas)
        rules.append(Rule("l2-mma", ok,
                          f"body: {len(mmas)} HMMA (want >= {want}, all TF32: "
                          f"{sorted(set(mmas))}), {mix(body).get('shared-load', 0)} shared + "
                          f"{mix(body).get('global-load', 0)} global loads"))

    worst = []
    want = [name for name in INT_PER_FFMA if name in loops]
    ahead = _template_args(tail.name)[2:3] == ["true"]
    for name in want:
        loc = markers.get(LOOP_MARKER[name])
        if loc is not None:
            s = loop_stats(hot_block(tail.instrs, loc), loc)
            cap = DOT_AHEAD_INT_PER_FFMA if ahead and name == "dot-fma" else INT_PER_FFMA[name]
            worst.append((name, s["int_per_ffma"], cap))
    rules.append(Rule("address-arithmetic",
                      len(worst) == len(want) and all(v <= cap for _, v, cap in worst),
                      ", ".join(f"{n}: {v} integer per FFMA (cap {cap})" for n, v, cap in worst)
                      or "no tagged loop found"))

    return rules


def check_rules(kernels: list[Kernel], markers: dict[str, tuple[str, int]],
                consts: dict[str, int]) -> list[Rule]:
    """The rules of the module docstring, each with what it saw."""
    rules = []
    bad = [f"{k.name} (STACK {k.resources.get('STACK')}, LOCAL {k.resources.get('LOCAL')}, "
           f"{mix(k.instrs).get('local', 0)} LDL/STL)" for k in kernels
           if k.resources.get("STACK", 0) or k.resources.get("LOCAL", 0) or mix(k.instrs).get("local")]
    rules.append(Rule("no-local-memory", not bad,
                      "; ".join(bad) or f"{len(kernels)} kernels: no stack, local memory or LDL/STL"))

    tails = _named(kernels, "step_tail_kernel")
    if not tails:
        return rules + [Rule("tail-fp32", False, "no step_tail_kernel in the binary")]
    steps = tails + _named(kernels, "step_head_kernel")  # every instantiation
    per_kernel = [(k, {r.name: r for r in _tail_rules(k, markers, consts)}) for k in steps]
    for name in LOOP_RULES:
        group = [(k, rs[name]) for k, rs in per_kernel if name in rs]
        rules.append(Rule(name, bool(group) and all(r.ok for _, r in group),
                          " | ".join(f"{k.name}: {r.detail}" for k, r in group)
                          or "no kernel of the step has this loop"))
    missing = []
    for stem in ("cluster_stats_kernel", "group_features_kernel"):
        ks = _named(kernels, stem)
        if not ks or not any(mix(k.instrs).get("shuffle") for k in ks):
            missing.append(stem if ks else f"{stem} (absent)")
    rules.append(Rule("warp-clustering", not missing,
                      f"no SHFL in {missing}" if missing else
                      "cluster_stats_kernel and group_features_kernel shuffle within a warp"))
    return rules


def report(kernels: list[Kernel], markers: dict[str, tuple[str, int]]) -> dict:
    """JSON-able report: per kernel resources and mix, per tagged loop its hot block's stats."""
    out = {"kernels": [], "loops": {}}
    for k in kernels:
        out["kernels"].append({"name": k.name, "mangled": k.mangled, "cubin": k.cubin,
                               "resources": k.resources, "mix": mix(k.instrs)})
    for name, loc in markers.items():
        for k in kernels:
            block = hot_block(k.instrs, loc)
            if block:  # one entry per loop and kernel (a template has one per instantiation)
                out["loops"][f"{name} {k.name}"] = {"loop": name, "kernel": k.name,
                                                    "source": f"{loc[0]}:{loc[1]}",
                                                    **loop_stats(block, loc)}
    return out


def format_text(rep: dict, rules: list[Rule] | None) -> str:
    """The report as a text table (and the rules' PASS/FAIL lines when checked)."""
    head = (f"{'kernel':34} {'REG':>4} {'STACK':>5} {'LOCAL':>5} {'SMEM':>5}  {'LDG 32/64/128':>13} "
            f"{'LDS':>5} {'FP32':>5} {'FP64':>5} {'INT':>5} {'MMA':>4} {'SHFL':>4}")
    lines = [head]
    for k in rep["kernels"]:
        r, m = k["resources"], k["mix"]
        ldg = "/".join(str(m.get(f"global-load-{b}", 0)) for b in (32, 64, 128))
        lines.append(f"{k['name'][:34]:34} {r.get('REG', '?'):>4} {r.get('STACK', '?'):>5} "
                     f"{r.get('LOCAL', '?'):>5} {r.get('SHARED', '?'):>5}  {ldg:>13} "
                     f"{m.get('shared-load', 0):>5} {m.get('fp32', 0):>5} {m.get('fp64', 0):>5} "
                     f"{m.get('int', 0):>5} {m.get('tensor', 0):>4} {m.get('shuffle', 0):>4}")
    for s in rep["loops"].values():
        lines.append(f"loop {s['loop']} ({s['kernel']}, {s['source']}): {s['instructions']} instructions, "
                     f"{s['tagged_ffma']} FFMA, {s.get('global-load', 0)} global loads "
                     f"({s['global_loads_before_first_ffma']} before the first FFMA), "
                     f"{s.get('shared-load', 0)} shared loads, {s.get('int', 0)} integer "
                     f"({s['int_per_ffma']} per FFMA), {s.get('const-load', 0)} constant loads")
    for r in rules or []:
        lines.append(f"{'PASS' if r.ok else 'FAIL'} {r.name}: {r.detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--so", type=Path, help="a built extension library (care_ext/_C*.so)")
    src.add_argument("--wheel", type=Path, help="a built wheel holding care_ext/_C*.so")
    src.add_argument("--cubin", type=Path, nargs="+",
                     help="cubins compiled by hand (nvcc -cubin -lineinfo ...; quicker than a build)")
    ap.add_argument("--check", action="store_true", help="apply the rules; exit 1 if one fails")
    ap.add_argument("--out", type=Path, help="write DIR/sass_report.{json,txt}")
    ap.add_argument("--cuobjdump", help="path of cuobjdump (default: PATH, CUDA_HOME, site-packages)")
    ap.add_argument("--nvdisasm", help="path of nvdisasm (same search)")
    ap.add_argument("--source", type=Path, default=CSRC,
                    help="the csrc/ the binary was built from (markers and tile sizes; default: this "
                         "checkout's)")
    args = ap.parse_args(argv)
    for path in args.cubin or [args.so or args.wheel]:
        if not path.is_file():
            ap.error(f"{path}: no such file")
    try:
        cuobjdump = find_tool("cuobjdump", args.cuobjdump)
        nvdisasm = find_tool("nvdisasm", args.nvdisasm)
    except FileNotFoundError as e:
        print(f"sass_report: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        cubins = binary_cubins(args.cubin, args.so, args.wheel, Path(tmp), cuobjdump)
        kernels = load_kernels(cubins, cuobjdump, nvdisasm)
    markers = sass_markers(args.source)
    consts = source_constants(args.source / "step_tail.h")
    rules = check_rules(kernels, markers, consts) if args.check else None
    rep = report(kernels, markers)
    if rules is not None:
        rep["rules"] = [vars(r) for r in rules]
    text = format_text(rep, rules)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sass_report.json").write_text(json.dumps(rep, indent=1))
        (args.out / "sass_report.txt").write_text(text + "\n")
    return 1 if rules and not all(r.ok for r in rules) else 0


if __name__ == "__main__":
    sys.exit(main())
