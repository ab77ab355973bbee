"""Where a kernel's warps wait, by function and by source line: Nsight Compute's per-instruction
view (``ncu --import REPORT --page source --csv --print-source sass``) joined with the line info
of the same binary's SASS (``nvdisasm -gi``; the build passes ``-lineinfo``).

ncu's CSV gives, per SASS instruction (by address), the warp-stall samples and their reasons, the
instructions executed and the shared/global traffic, but no source line for inlined code (the
tail kernel is one function after inlining). This tool disassembles the binary the report was
taken from (``--so``, ``--wheel`` or ``--cubin``; needs no GPU), checks that the kernel's
instructions match the CSV's opcode for opcode, and attributes each instruction to

* its innermost source line (file:line) and
* its function: the innermost enclosing function of that line's inline chain that has more than
  ``--min-lines`` lines of source (so one-line helpers such as ``relu_f`` or ``mma_tf32`` count
  for their caller), read from the sources under ``--source`` (default: this checkout's csrc/).

Printed and written (``--out``: DIR/ncu_source.json and .txt): per function and per line the share
of stall samples and of executed warp instructions, the top stall reasons, and the excess
shared-memory wavefronts (bank conflicts) and L2 sectors.

  ncu -o /tmp/tail --section SourceCounters ... python3 run.py        (on the GPU machine)
  ncu -i /tmp/tail.ncu-rep --page source --csv --print-source sass > tail_sass.csv
  python3 bench/ncu_source.py --csv tail_sass.csv --so care_ext/_C*.so --kernel step_tail_kernel
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sass_report import CSRC, _run, binary_cubins, find_tool  # noqa: E402

_SECTION = re.compile(r"\s*\.text\.(\S+):")
_FILE = re.compile(r'\s*//## File "([^"]+)", line (\d+)')
_INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


@dataclass
class Sass:
    """One instruction of the disassembly: offset in its kernel, text, inline chain of source
    locations (innermost first)."""

    offset: int
    text: str
    chain: tuple[tuple[str, int], ...]


def parse_chains(text: str) -> dict[str, list[Sass]]:
    """``nvdisasm -gi`` output -> {mangled kernel: instructions with their inline chains}. A run
    of ``//## File`` comments above an instruction lists its line first, then its callers'."""
    out: dict[str, list[Sass]] = {}
    cur: list[Sass] | None = None
    chain: list[tuple[str, int]] = []
    fresh = True
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            cur, chain, fresh = out.setdefault(m.group(1), []), [], True
            continue
        m = _FILE.match(line)
        if m:
            if fresh:
                chain, fresh = [], False
            chain.append((Path(m.group(1)).name, int(m.group(2))))
            continue
        m = _INSTR.match(line)
        if m and cur is not None:
            cur.append(Sass(int(m.group(1), 16), m.group(2), tuple(chain)))
            fresh = True
    return out


_HEADER = re.compile(r"^(?!(struct|class|namespace|using|constexpr|static_assert|typedef|enum|#|//|"
                     r"}|\s))[^;]*?\b([A-Za-z_]\w*)\s*\(")


def function_spans(source: str) -> list[tuple[str, int, int]]:
    """(name, first line, last line) of each function defined at column 0 in a C++/CUDA source:
    from its header line (the line naming it, after any ``template <...>`` line) to the next line
    that is a lone ``}`` at column 0. Member functions inside structs are not listed (their lines
    count for no function)."""
    spans, name, start, named_next = [], None, 0, False
    for i, line in enumerate(source.splitlines(), 1):
        if named_next:  # `__global__ void __launch_bounds__(...)` names the kernel on the next line
            m = re.search(r"\b([A-Za-z_]\w*)\s*\(", line)
            name, named_next = (m.group(1) if m else name), False
        if name is None:
            m = _HEADER.match(line)
            if m and not line.startswith("template"):
                name, start = m.group(2), i
                named_next = name == "__launch_bounds__"
                if line.rstrip().endswith("}"):  # a one-line function
                    spans.append((name, start, i))
                    name = None
        elif line.startswith("}"):
            spans.append((name, start, i))
            name = None
    return spans


class Functions:
    """Maps (file, line) to its enclosing function, from the sources under ``root``."""

    def __init__(self, root: Path) -> None:
        self.spans: dict[str, list[tuple[str, int, int]]] = {}
        for path in sorted(root.rglob("*")):
            if path.suffix in (".h", ".cuh", ".cu", ".cpp"):
                self.spans.setdefault(path.name, function_spans(path.read_text()))

    def at(self, loc: tuple[str, int]) -> tuple[str, int] | None:
        """(name, length in lines) of the function holding line loc, or None."""
        for name, a, b in self.spans.get(loc[0], []):
            if a <= loc[1] <= b:
                return name, b - a + 1
        return None

    def owner(self, chain: tuple[tuple[str, int], ...], min_lines: int) -> str:
        """The innermost function of an inline chain longer than min_lines (helpers count for
        their caller); the innermost location's file:line when none is known."""
        for loc in chain:
            f = self.at(loc)
            if f is not None and f[1] > min_lines:
                return f[0]
        return f"{chain[0][0]}:{chain[0][1]}" if chain else "?"


def _int(v: str) -> int:
    v = v.replace(",", "").strip()
    return int(float(v)) if v not in ("", "-") else 0


def read_ncu_csv(path: Path) -> tuple[str, list[dict[str, str]]]:
    """ncu's ``--page source --csv --print-source sass`` output: (kernel name, one dict per
    instruction). Raises ValueError when the file is not that page."""
    rows = list(csv.reader(path.open()))
    hi = next((i for i, r in enumerate(rows) if r and r[0] == "Address"), None)
    if hi is None or SAMPLES not in rows[hi]:
        raise ValueError(f"{path}: not an ncu source page with warp-stall samples (want the "
                         "SourceCounters section and --page source --csv --print-source sass)")
    kernel = rows[0][1] if rows and len(rows[0]) > 1 and rows[0][0] == "Kernel Name" else ""
    hdr = rows[hi]
    return kernel, [dict(zip(hdr, r)) for r in rows[hi + 1:] if len(r) == len(hdr)]


def attribute(rows: list[dict[str, str]], sass: list[Sass], funcs: Functions,
              min_lines: int = 8) -> dict:
    """Joins the CSV rows (in address order, from the kernel's start) with the disassembly.
    Raises ValueError when the two are not the same code (count or opcodes differ)."""
    if len(rows) != len(sass):
        raise ValueError(f"the report has {len(rows)} instructions, the binary's kernel "
                         f"{len(sass)}: not the same build")
    base = int(rows[0]["Address"], 16)
    by_off = {s.offset: s for s in sass}
    stall_cols = [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]
    tally = {"function": collections.defaultdict(collections.Counter),
             "line": collections.defaultdict(collections.Counter)}
    for r in rows:
        s = by_off.get(int(r["Address"], 16) - base)
        op = r["Source"].split()
        if s is None or not op or op[0] not in s.text.split():
            raise ValueError(f"instruction at {r['Address']} is {r['Source'].strip()!r} in the "
                             f"report but {s.text if s else 'absent'!r} in the binary")
        keys = {"function": funcs.owner(s.chain, min_lines),
                "line": f"{s.chain[0][0]}:{s.chain[0][1]}" if s.chain else "?"}
        for kind, key in keys.items():
            c = tally[kind][key]
            c["samples"] += _int(r[SAMPLES])
            c["executed"] += _int(r[EXECUTED])
            c["shared_wavefronts"] += _int(r.get("L1 Wavefronts Shared", "0"))
            c["shared_excess"] += _int(r.get("L1 Wavefronts Shared Excessive", "0"))
            c["l2_sectors"] += _int(r.get("L2 Theoretical Sectors Global", "0"))
            for col in stall_cols:
                c["stall:" + col[len("stall_"):]] += _int(r[col])
    total = {k: sum(c[k] for c in tally["line"].values())
             for k in ("samples", "executed", "shared_wavefronts", "shared_excess", "l2_sectors")}
    out = {"total": total}
    for kind, groups in tally.items():
        out[kind] = sorted(({"name": k, **dict(c)} for k, c in groups.items()),
                           key=lambda d: -d["samples"])
    return out


def format_table(att: dict, kernel: str, top: int, source: Path) -> str:
    t = att["total"]
    lines = [f"{kernel}: {t['samples']} stall samples, {t['executed'] / 1e6:.2f} M warp "
             f"instructions, {t['shared_wavefronts']} shared wavefronts ({t['shared_excess']} "
             f"excess), {t['l2_sectors']} L2 sectors"]

    def row(d: dict, text: str = "") -> str:
        stalls = sorted(((k[6:], v) for k, v in d.items() if k.startswith("stall:")),
                        key=lambda kv: -kv[1])[:3]
        why = ", ".join(f"{k} {100 * v / max(d['samples'], 1):.0f}%" for k, v in stalls if v)
        stall = 100 * d["samples"] / max(t["samples"], 1)
        instr = 100 * d["executed"] / max(t["executed"], 1)
        return (f"  {stall:5.1f}% {instr:5.1f}%  {d['name'][:34]:34s} {why:42s} "
                f"{d['shared_excess']:>9} {text}")
    head = f"  {'stall':>6} {'instr':>6}  {'':34s} {'top stall reasons':42s} {'excess':>9}"
    lines += ["by function", head] + [row(d) for d in att["function"][:top]]
    texts: dict[str, list[str]] = {}
    lines += ["by source line", head + " source"]
    for d in att["line"][:top]:
        f, _, n = d["name"].rpartition(":")
        if f and f not in texts:
            hits = list(source.rglob(f))
            texts[f] = hits[0].read_text().splitlines() if hits else []
        src = texts.get(f, [])
        lines.append(row(d, src[int(n) - 1].strip()[:50] if n.isdigit() and 0 < int(n) <= len(src)
                         else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", type=Path, required=True,
                    help="ncu --page source --csv --print-source sass of one kernel")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--so", type=Path, help="the extension library the report was taken from")
    src.add_argument("--wheel", type=Path, help="a wheel holding that library")
    src.add_argument("--cubin", type=Path, nargs="+", help="its cubins")
    ap.add_argument("--kernel", default="step_tail_kernel",
                    help="a substring of the kernel's mangled name; with several matches the one "
                         "whose instruction count equals the report's")
    ap.add_argument("--source", type=Path, default=CSRC, help="the csrc/ it was built from")
    ap.add_argument("--min-lines", type=int, default=8,
                    help="functions of at most this many lines count for their caller")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", type=Path, help="write DIR/ncu_source.{json,txt}")
    ap.add_argument("--cuobjdump")
    ap.add_argument("--nvdisasm")
    args = ap.parse_args(argv)
    try:
        kernel, rows = read_ncu_csv(args.csv)
        cuobjdump = find_tool("cuobjdump", args.cuobjdump)
        nvdisasm = find_tool("nvdisasm", args.nvdisasm)
    except (ValueError, FileNotFoundError) as e:
        print(f"ncu_source: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        code: dict[str, list[Sass]] = {}
        for c in binary_cubins(args.cubin, args.so, args.wheel, Path(tmp), cuobjdump):
            code.update(parse_chains(_run([nvdisasm, "-c", "-gi", str(c)])))
    cands = [k for k in code if args.kernel in k]
    fits = [k for k in cands if len(code[k]) == len(rows)]
    if not fits:
        sizes = {k: len(code[k]) for k in cands}
        print(f"ncu_source: no kernel matching {args.kernel!r} has the report's {len(rows)} "
              f"instructions ({sizes}): another build?", file=sys.stderr)
        return 2
    try:
        att = attribute(rows, code[fits[0]], Functions(args.source), args.min_lines)
    except ValueError as e:
        print(f"ncu_source: {e}", file=sys.stderr)
        return 2
    text = format_table(att, kernel or fits[0], args.top, args.source)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ncu_source.json").write_text(json.dumps({"kernel": kernel, **att}, indent=1))
        (args.out / "ncu_source.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
