"""bench/ncu_source.py: ncu's per-instruction source page joined with the binary's line info. The
disassembly below has the shape of real `nvdisasm -c -gi` output (an inlined chain: the first
comment of a run is the instruction's line, the next ones its callers'); the CSV has the columns of
`ncu --page source --csv --print-source sass` (Nsight Compute 2025, H200, 2026-11-27)."""
from __future__ import annotations

import csv
import io

import pytest

N = None  # bench/ncu_source.py, imported once bench/ is on sys.path (conftest fixture)


@pytest.fixture(autouse=True)
def _ncu_source(_bench_on_path):
    global N
    import ncu_source

    N = ncu_source


SOURCE = """\
// a kernel's source
CARE_HD float relu_f(float v) { return v > 0.f ? v : 0.f; }

template <int M>
CARE_HD void head_dot(const float* w, float* v) {
  // line 6
  for (int j = 0; j < 8; ++j) {
    v[0] += w[j];
  }
  // line 10
  v[0] = relu_f(v[0]);
}

struct S {
  int member(int x) { return x; }
};

__global__ void __launch_bounds__(256, 2)
    tail_kernel(float* w, float* v) {
  float* x = w;
  head_dot<1>(x, v);
}
"""

KERNEL = "_Z11tail_kernelPfS_"
DISASM = f"""\t.target\tsm_90
\t.section\t.text.{KERNEL},"ax",@progbits
.text.{KERNEL}:
\t//## File "/x/csrc/cuda/t.cu", line 20
        /*0000*/                   LDC R1, c[0x0][0x28] ;
\t//## File "/x/csrc/cuda/t.cu", line 8 inlined at "/x/csrc/cuda/t.cu", line 21
\t//## File "/x/csrc/cuda/t.cu", line 21
        /*0010*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0020*/                   FADD R5, R5, R4 ;
\t//## File "/x/csrc/cuda/t.cu", line 2 inlined at "/x/csrc/cuda/t.cu", line 11
\t//## File "/x/csrc/cuda/t.cu", line 11 inlined at "/x/csrc/cuda/t.cu", line 21
\t//## File "/x/csrc/cuda/t.cu", line 21
        /*0030*/                   FMNMX R5, RZ, R5, !PT ;
\t//## File "/x/csrc/cuda/t.cu", line 22
        /*0040*/                   EXIT ;
"""

COLUMNS = ["Address", "Source", "Warp Stall Sampling (All Samples)",
           "Warp Stall Sampling (Not-issued Samples)", "Instructions Executed",
           "L1 Wavefronts Shared Excessive", "L1 Wavefronts Shared",
           "L2 Theoretical Sectors Global",
           "stall_long_sb", "stall_wait", "stall_barrier", "stall_wait (Not Issued)"]


def _csv(rows, base=0x7F00_0000_0000):
    out = io.StringIO()
    w = csv.writer(out, quoting=csv.QUOTE_ALL)
    w.writerow(["Kernel Name", "void tail_kernel(float *, float *)", ""])
    w.writerow(COLUMNS)
    for off, src, samples, executed, long_sb, wait in rows:
        w.writerow([hex(base + off), f"      {src}", samples, samples, executed, 0, 0, 4,
                    long_sb, wait, samples - long_sb - wait, 0])
    return out.getvalue()


ROWS = [(0x00, "LDC R1, c[0x0][0x28]", 2, 10, 0, 2),
        (0x10, "LDG.E R4, desc[UR4][R2.64]", 10, 80, 0, 10),
        (0x20, "FADD R5, R5, R4", 50, 80, 40, 10),
        (0x30, "FMNMX R5, RZ, R5, !PT", 6, 10, 0, 6),
        (0x40, "EXIT", 0, 10, 0, 0)]


def _inputs(tmp_path, rows=ROWS):
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "csrc" / "cuda" / "t.cu").write_text(SOURCE)
    (tmp_path / "src.csv").write_text(_csv(rows))
    kernel, parsed = N.read_ncu_csv(tmp_path / "src.csv")
    return kernel, parsed, N.parse_chains(DISASM)[KERNEL], N.Functions(tmp_path / "csrc")


def test_function_spans_follow_the_source():
    spans = {name: (a, b) for name, a, b in N.function_spans(SOURCE)}
    assert spans == {"relu_f": (2, 2), "head_dot": (5, 12), "tail_kernel": (18, 22)}  # no member


def test_samples_go_to_their_line_and_to_the_innermost_function_longer_than_a_helper(tmp_path):
    kernel, rows, sass, funcs = _inputs(tmp_path)
    assert kernel == "void tail_kernel(float *, float *)" and len(rows) == len(sass) == 5
    assert sass[3].chain == (("t.cu", 2), ("t.cu", 11), ("t.cu", 21))
    att = N.attribute(rows, sass, funcs, min_lines=3)
    by_fn = {d["name"]: d for d in att["function"]}
    # relu_f (one line) counts for head_dot, its caller; the kernel's own lines for tail_kernel
    assert by_fn["head_dot"]["samples"] == 66 and by_fn["tail_kernel"]["samples"] == 2
    assert by_fn["head_dot"]["stall:long_sb"] == 40 and by_fn["head_dot"]["stall:wait"] == 26
    assert att["function"][0]["name"] == "head_dot"  # sorted by samples
    by_line = {d["name"]: d for d in att["line"]}
    assert by_line["t.cu:8"]["samples"] == 60 and by_line["t.cu:8"]["executed"] == 160
    assert by_line["t.cu:2"]["samples"] == 6  # the helper's own line still shows
    assert att["total"]["samples"] == 68 and att["total"]["l2_sectors"] == 20
    # with every function counted, the helper keeps its samples
    every = N.attribute(rows, sass, funcs, min_lines=0)["function"]
    assert {d["name"] for d in every} >= {"relu_f"}
    text = N.format_table(att, kernel, 5, tmp_path / "csrc")
    assert "head_dot" in text and "v[0] += w[j];" in text


def test_a_report_of_another_build_is_refused(tmp_path):
    rows = list(ROWS)
    rows[2] = (0x20, "FFMA R5, R5, R4, R5", 50, 80, 40, 10)  # another opcode at that address
    _, parsed, sass, funcs = _inputs(tmp_path, rows)
    with pytest.raises(ValueError, match="FFMA .* in the report but 'FADD"):
        N.attribute(parsed, sass, funcs)
    with pytest.raises(ValueError, match="the report has 4 instructions, the binary's kernel 5"):
        N.attribute(parsed[:4], sass, funcs)


def test_a_csv_that_is_not_the_source_page_is_refused(tmp_path):
    (tmp_path / "details.csv").write_text('"ID","Kernel Name","Metric Name"\n"0","k","Duration"\n')
    with pytest.raises(ValueError, match="not an ncu source page"):
        N.read_ncu_csv(tmp_path / "details.csv")
