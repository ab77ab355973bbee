"""bench/sass_report.py: reading nvdisasm / cuobjdump output and the rules it checks the kernels'
SASS against. The text below is cut from real `nvdisasm -c -gi` and `cuobjdump -res-usage` output
of the sm_90 build (nvcc 13.0); CI runs the script itself on the wheel it compiles."""
from __future__ import annotations

import pytest

S = None  # bench/sass_report.py, imported once bench/ is on sys.path (conftest fixture)


@pytest.fixture(autouse=True)
def _sass_report(_bench_on_path):
    global S
    import sass_report

    S = sass_report

KERNEL = "_ZN8care_ext46_GLOBAL__N__df3bacde_13_step_fused_cu_487f957f16step_tail_kernelENS_12StepTailArgsE"

DISASM = f"""\t.target\tsm_90

//--------------------- .text.{KERNEL} --------------------------
\t.section\t.text.{KERNEL},"ax",@progbits
\t.align\t128
.text.{KERNEL}:
        .type           {KERNEL},@function
{KERNEL}:
\t//## File "/work/main/csrc/cuda/step_fused.cu", line 23
        /*0000*/                   LDC R1, c[0x0][0x28] ;
\t//## File "/work/main/csrc/cuda/../step_tail.h", line 130 inlined at "/work/main/csrc/cuda/step_fused.cu", line 25
\t//## File "/work/main/csrc/cuda/step_fused.cu", line 25
        /*0010*/                   FFMA R67, R44, R39, R12 ;
        /*0020*/              @!P0 LDG.E.128 R4, desc[UR14][R2.64] ;
.L_x_7:
\t//## File "/work/main/csrc/cuda/../step_tail.h", line 29 inlined at "/work/main/csrc/cuda/step_fused.cu", line 25
        /*0030*/                   LDS R44, [R43+-0x10] ;
        /*0040*/                   BRA `(.L_x_7) ;
        /*0050*/                   EXIT ;
        .weak           $__internal_0_$__cuda_sm20_div_rn_f64_full
$__internal_0_$__cuda_sm20_div_rn_f64_full:
        /*0060*/                   DFMA R22, R20, -R18, 1 ;
        /*0070*/                   RET.REL.NODEC R2 `({KERNEL}) ;
"""

RES = f"""
Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function {KERNEL}:
  REG:80 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:1120 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_disassembly_gives_every_instruction_its_innermost_source_line():
    code = S.parse_disasm(DISASM)
    assert list(code) == [KERNEL]
    ins = [i for i in code[KERNEL] if not i.label]
    assert [i.op for i in ins] == ["LDC", "FFMA", "LDG.E.128", "LDS", "BRA", "EXIT", "DFMA", "RET.REL.NODEC"]
    # an inlined line is named by the first comment of its run, not by its caller's
    assert [i.loc for i in ins[:6]] == [("step_fused.cu", 23), ("step_tail.h", 130), ("step_tail.h", 130),
                                      ("step_tail.h", 29), ("step_tail.h", 29), ("step_tail.h", 29)]
    # the appended runtime routine has no line info: it must not inherit the kernel's last line
    assert ins[6].loc == ("$__internal_0_$__cuda_sm20_div_rn_f64_full", 0)
    assert ins[1].addr == 0x10 and ins[2].operands.startswith("R4, desc")


def test_basic_blocks_split_at_labels_and_after_branches():
    blocks = S.basic_blocks(S.parse_disasm(DISASM)[KERNEL])
    assert [[i.op for i in b] for b in blocks] == [
        ["LDC", "FFMA", "LDG.E.128"], ["LDS", "BRA"], ["EXIT"], ["DFMA", "RET.REL.NODEC"]]


def test_resource_usage_per_kernel():
    assert S.parse_res_usage(RES) == {KERNEL: {"REG": 80, "STACK": 0, "SHARED": 1024, "LOCAL": 0,
                                               "CONSTANT[0]": 1120, "TEXTURE": 0, "SURFACE": 0,
                                               "SAMPLER": 0}}


@pytest.mark.parametrize("op, cls, bits", [
    ("LDG.E", "global-load", 32), ("LDG.E.128", "global-load", 128), ("LDG.E.64.CONSTANT", "global-load", 64),
    ("LDG.E.U8", "global-load", 8), ("LDS", "shared-load", 32), ("LDS.128", "shared-load", 128),
    ("STG.E", "global-store", 32), ("STS", "shared-store", 32), ("LDL", "local", 32), ("STL.64", "local", 64),
    ("FFMA", "fp32", 32), ("DFMA", "fp64", 32), ("F2F.F64.F32", "fp64", 32), ("MUFU.RCP64H", "fp64", 32),
    ("MUFU.RCP", "fp32", 32), ("HMMA.16816.F32.BF16", "tensor", 32), ("HGMMA.64x128x16.F32.BF16", "tensor", 32),
    ("IMAD.WIDE.U32", "int", 32), ("UIADD3", "int", 32), ("LEA.HI.X", "int", 32), ("SHFL.IDX", "shuffle", 32),
    ("BRA", "control", 32), ("LDC.64", "const-load", 64)])
def test_opcode_classes_and_widths(op, cls, bits):
    assert S.op_class(op) == cls
    assert S.load_width(op) == bits


def _kernel(name, body, res=None):
    """A kernel from (opcode, file, line) triples, a label before each opcode "|"."""
    instrs = []
    for k, (op, f, line) in enumerate(body):
        instrs.append(S.Instr(-1, ".L_x_1", label=True) if op == "|" else S.Instr(16 * k, op, "", (f, line)))
    return S.Kernel(name, name, "x.cubin", res or {"REG": 40, "STACK": 0, "LOCAL": 0}, instrs)


MARKERS = {"l2-fma": ("step_tail.h", 130), "dot-fma": ("step_tail.h", 105),
           "l2-mma": ("step_tail.h", 319), "head-fma": ("step_tail.h", 1100)}
CONSTS = {"kL2TileRows": 4, "kL2TileUnits": 4, "kL2Steps": 4, "kDotChunk": 16, "kMmaUnitTiles": 2,
          "kHeadSub": 4}


def _tail(l2_loads=16, l2_lds=4, l2_int=40, dot_ahead=16, dot_int=60, fp64_at=None,
          mma_op="HMMA.1688.F32.TF32", mmas=6):
    l2 = ([("|", "", 0)] + [("LDG.E", "step_tail.h", 29)] * l2_loads + [("LDS", "step_tail.h", 128)] * l2_lds
          + [("IADD3", "step_tail.h", 29)] * l2_int + [("FFMA", "step_tail.h", 130)] * 64 + [("BRA", "", 0)])
    dot = ([("|", "", 0)] + [("LDG.E", "step_tail.h", 29)] * dot_ahead + [("IMAD.WIDE", "step_tail.h", 29)] * dot_int
           + [("FFMA", "step_tail.h", 105)] * 64 + [("LDG.E", "step_tail.h", 29)] * (64 - dot_ahead)
           + [("BRA", "", 0)])
    mma = ([("|", "", 0)] + [("LDS", "step_tail.h", 290)] * 12 + [("FADD", "step_tail.h", 310)] * 8
           + [(mma_op, "step_tail.h", 319)] * mmas + [("BRA", "", 0)])
    extra = [("DADD", "step_tail.h", fp64_at)] if fp64_at else []
    return _kernel("step_tail_kernel", l2 + dot + mma + extra
                   + [("DFMA", "group_math.h", 194), ("EXIT", "", 0)])


def _head(global_loads=0, ints=20, ffma=64):
    """step_head_kernel's layer-1 chunk (head_chunk_fmas, head-fma): kHeadSub x kDotChunk FFMAs on
    weights from shared memory (one LDS per weight, one LDS.128 per 4 inputs of a prompt); the
    finish's dot products (dot-fma, global loads ahead) in a body of their own."""
    layer1 = ([("|", "", 0)] + [("LDS.128", "step_tail.h", 1095)] * 16
              + [("LDS", "step_tail.h", 1098)] * 16 + [("LDG.E", "step_tail.h", 690)] * global_loads
              + [("IMAD.WIDE", "step_tail.h", 690)] * ints
              + [("FFMA", "step_tail.h", 1100)] * ffma + [("BRA", "", 0)])
    finish = ([("|", "", 0)] + [("LDG.E", "step_tail.h", 29)] * 16
              + [("FFMA", "step_tail.h", 105)] * 64 + [("BRA", "", 0)])
    return _kernel("step_head_kernel", layer1 + finish + [("EXIT", "", 0)])


def _shufflers():
    """The step's other kernels, as generated when right: the clustering ones and the head."""
    return [_kernel(n, [("SHFL.IDX", "common.cuh", 40)]) for n in ("cluster_stats_kernel", "group_features_kernel")] \
        + [_head()]


def _verdicts(kernels):
    return {r.name: r.ok for r in S.check_rules(kernels, MARKERS, CONSTS)}


def test_rules_pass_on_code_generated_as_meant():
    v = _verdicts([_tail(), *_shufflers()])
    assert v == {"no-local-memory": True, "tail-fp32": True, "l2-tile": True, "dot-loads-ahead": True,
                 "l2-mma": True, "head-shared-weights": True, "address-arithmetic": True,
                 "warp-clustering": True}


@pytest.mark.parametrize("kernels, failing", [
    (lambda: [_tail(), _kernel("cag_kernel<float>", [("STL", "cag.cu", 3)]), *_shufflers()], "no-local-memory"),
    (lambda: [_tail(), _kernel("x", [], {"REG": 40, "STACK": 16, "LOCAL": 0}), *_shufflers()], "no-local-memory"),
    (lambda: [_tail(fp64_at=264), *_shufflers()], "tail-fp32"),       # a double literal in the tail
    (lambda: [_tail(l2_loads=32), *_shufflers()], "l2-tile"),         # a weight load per 2 FFMAs
    (lambda: [_tail(l2_lds=16), *_shufflers()], "l2-tile"),           # scalar r1 loads, not float4
    (lambda: [_tail(dot_ahead=4), *_shufflers()], "dot-loads-ahead"),  # loads issued one by one
    (lambda: [_tail(mmas=3), *_shufflers()], "l2-mma"),               # not unrolled over the tiles
    (lambda: [_tail(mma_op="HMMA.16816.F32.BF16"), *_shufflers()], "l2-mma"),  # not TF32
    (lambda: [_tail(mmas=0), *_shufflers()], "l2-mma"),               # no tensor-core layer 2
    (lambda: [_tail(l2_int=180), *_shufflers()], "address-arithmetic"),
    (lambda: [_tail(dot_int=140), *_shufflers()], "address-arithmetic"),
    (lambda: [_tail(), _kernel("cluster_stats_kernel", [("LDG.E.64", "cluster.cu", 9)]),
              _kernel("group_features_kernel", [("SHFL.IDX", "common.cuh", 40)]), _head()],
     "warp-clustering"),
    (lambda: [_tail(), *_shufflers()[:2]], "head-shared-weights"),  # no head kernel in the binary
])
def test_each_rule_fails_on_what_it_guards_against(kernels, failing):
    v = _verdicts(kernels())
    assert [name for name, ok in v.items() if not ok] == [failing]


def test_every_instantiation_of_the_tail_is_checked():
    """step_tail_kernel<1> and step_tail_kernel<4> are two kernels: a rule fails when either does."""
    good, bad = _tail(), _tail(l2_int=180)
    good.name, bad.name = "step_tail_kernel<1>", "step_tail_kernel<4>"
    rules = {r.name: r for r in S.check_rules([good, bad, *_shufflers()], MARKERS, CONSTS)}
    assert not rules["address-arithmetic"].ok and rules["l2-tile"].ok
    assert "step_tail_kernel<4>: l2-fma: 2.812" in rules["address-arithmetic"].detail


def test_the_pipelined_dots_have_their_own_integer_cap():
    """step_tail_kernel<M, false, true> (CARE_EXT_TAIL_DOT_AHEAD) may spend up to
    DOT_AHEAD_INT_PER_FFMA integer instructions per FFMA in its dot products (a 64-bit add per
    weight address), the plain tail only INT_PER_FFMA's; past that cap it fails too."""
    per = lambda r: round(r * 64)  # noqa: E731  (integer instructions for 64 FFMAs)
    between = (S.INT_PER_FFMA["dot-fma"] + S.DOT_AHEAD_INT_PER_FFMA) / 2
    plain, ahead = _tail(dot_int=per(between)), _tail(dot_int=per(between))
    plain.name, ahead.name = "step_tail_kernel<1, false, false>", "step_tail_kernel<1, false, true>"
    assert not _verdicts([plain, *_shufflers()])["address-arithmetic"]
    assert _verdicts([ahead, *_shufflers()])["address-arithmetic"]
    over = _tail(dot_int=per(S.DOT_AHEAD_INT_PER_FFMA + 0.5))
    over.name = "step_tail_kernel<1, false, true>"
    assert not _verdicts([over, *_shufflers()])["address-arithmetic"]


def _loops(tail, l2=True, dot=True, mma=True):
    """tail's instructions less the blocks of the loops left out (each block starts at a label)."""
    keep, cut = [], {"step_tail.h:130": not l2, "step_tail.h:105": not dot, "step_tail.h:319": not mma}
    blocks, cur = [], []
    for i in tail.instrs:
        if i.label and cur:
            blocks.append(cur)
            cur = []
        cur.append(i)
    blocks.append(cur)
    for b in blocks:
        locs = {f"{i.loc[0]}:{i.loc[1]}" for i in b if not i.label and i.loc}
        if not any(cut.get(loc) for loc in locs):
            keep += b
    return S.Kernel(tail.name, tail.name, tail.cubin, tail.resources, keep)


def test_a_split_head_is_checked_in_the_head_kernel():
    """CARE_EXT_TAIL_HEAD=split: step_tail_kernel<M, true> has no dot products (the rule does not
    ask it to) and step_head_kernel has only head layer 1's shared-memory loop (checked there):
    all pass; a head kernel whose layer 1 reads its weights from global memory, or runs less than
    a whole chunk for kHeadSub prompts per body, fails head-shared-weights."""
    def kernels(split_l2=True, **head):
        full, split = _tail(), _loops(_tail(), dot=False, l2=split_l2)
        full.name, split.name = "step_tail_kernel<1, false>", "step_tail_kernel<1, true>"
        return [full, split, _head(**head), *_shufflers()[:2]]

    assert all(_verdicts(kernels()).values()), _verdicts(kernels())
    rules = {r.name: r for r in S.check_rules(kernels(), MARKERS, CONSTS)}
    assert "step_head_kernel: body: 64 FFMA (want >= 64), 0 global loads (want 0), 32 shared " \
        "loads" in rules["head-shared-weights"].detail
    assert "step_head_kernel" not in rules["dot-loads-ahead"].detail
    assert "step_tail_kernel<1, true>" not in rules["dot-loads-ahead"].detail
    assert [n for n, ok in _verdicts(kernels(global_loads=16)).items() if not ok] == \
        ["head-shared-weights"]
    assert [n for n, ok in _verdicts(kernels(ffma=32)).items() if not ok] == \
        ["head-shared-weights"]
    assert [n for n, ok in _verdicts(kernels(ints=120)).items() if not ok] == \
        ["address-arithmetic"]
    assert [n for n, ok in _verdicts(kernels(split_l2=False)).items() if not ok] == \
        ["l2-tile", "address-arithmetic"]
    assert S.expected_loops("step_tail_kernel<4, true>") == {"l2-fma", "l2-mma"}
    assert S.expected_loops("step_tail_kernel<4>") == {"l2-fma", "dot-fma", "l2-mma"}
    # the third argument (kAhead, CARE_EXT_TAIL_DOT_AHEAD) does not make a tail a split one
    assert S.expected_loops("step_tail_kernel<4, true, false>") == {"l2-fma", "l2-mma"}
    assert S.expected_loops("step_tail_kernel<1, false, true>") == {"l2-fma", "dot-fma",
                                                                     "l2-mma"}
    assert S.expected_loops("step_head_kernel") == {"head-fma"}
    assert S.LOOP_MARKER["head-fma"] == "head-fma"


def test_no_tail_kernel_is_a_failure_not_a_pass():
    rules = S.check_rules(_shufflers(), MARKERS, CONSTS)
    assert not all(r.ok for r in rules) and "no step_tail_kernel" in rules[-1].detail


def test_the_markers_and_tile_sizes_are_in_the_source():
    """The rules find their loops by `// sass:` tags and their bounds in step_tail.h: a refactor
    that drops a tag or renames a constant must show up here, not as a vacuous pass in CI."""
    m = S.sass_markers()
    assert set(m) >= {"l2-fma", "dot-fma", "l2-mma", "head-fma"} and \
        all(f == "step_tail.h" for f, _ in m.values())
    lines = (S.CSRC / "step_tail.h").read_text().splitlines()
    assert all("+=" in lines[m[k][1] - 1] for k in ("l2-fma", "dot-fma", "head-fma"))
    # the mma marker is on the asm statement's last line (where nvcc's line info puts its HMMA)
    asm = "\n".join(lines[m["l2-mma"][1] - 4:m["l2-mma"][1]])
    assert "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32" in asm and lines[m["l2-mma"][1] - 1].endswith(
        ");  // sass: l2-mma")
    c = S.source_constants()
    assert {"kL2TileRows", "kL2TileUnits", "kL2Steps", "kDotChunk", "kMmaUnitTiles",
            "kHeadSub"} <= set(c)


def test_duplicate_markers_are_refused(tmp_path):
    (tmp_path / "a.h").write_text("x += 1;  // sass: l2-fma\ny += 2;  // sass: l2-fma\n")
    with pytest.raises(ValueError, match="twice"):
        S.sass_markers(tmp_path)


def test_a_missing_tool_is_named_with_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(S.sysconfig, "get_paths", lambda: {"purelib": str(tmp_path), "platlib": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="pip install nvidia-cuda-cuobjdump"):
        S.find_tool("cuobjdump")
    assert S.main(["--cubin", __file__]) == 2


def test_a_wheel_without_the_extension_is_refused(tmp_path):
    import zipfile

    whl = tmp_path / "x.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("care_ext/__init__.py", "")
    with pytest.raises(ValueError, match="expected one care_ext/_C"):
        S.so_from_wheel(whl, tmp_path)
