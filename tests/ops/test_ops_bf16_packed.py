"""The split pieces packed for oneDNN's bf16 BRGeMM (care_ext::_pack_bf16_split,
care_ext.bf16_split.pack_first_layer_split) and the CPU split step on them (first_layer_split of 4
tensors): the packing is the documented layout, and the step on packed pieces matches the float64
composition as the unpacked step does. Where the CPU has no AMX (build_info's cpu_brgemm false)
the packing is refused and the step rejects packed pieces with a message that says so."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from care_ext.bf16_split import (PACK_COLS, cpu_brgemm_available, first_layer_split,
                                 pack_first_layer_split, packed_numel)
from ops_testutil import assert_step_like_reference, run_step, step_inputs

pytestmark = pytest.mark.native

needs_brgemm = pytest.mark.skipif(not cpu_brgemm_available(),
                                  reason="no AMX bf16 BRGeMM here (build_info's cpu_brgemm)")


def _layout(split: torch.Tensor) -> torch.Tensor:
    """The documented packed layout, built element by element in torch (int16 bits): for every
    block of PACK_COLS split rows (nb rows, ld = nb rounded up to 16), B[k, n] = row n0 + n,
    column k at (k // 2) * 2 * ld + 2 * n + k % 2, padding columns zero; blocks back to back."""
    T, R, H = split.shape
    rows = split.reshape(T * R, H).view(torch.int16)
    parts = []
    for n0 in range(0, T * R, PACK_COLS):
        nb = min(PACK_COLS, T * R - n0)
        ld = (nb + 15) // 16 * 16
        block = torch.zeros(H // 2, ld, 2, dtype=torch.int16)
        block[:, :nb, :] = rows[n0:n0 + nb].reshape(nb, H // 2, 2).permute(1, 0, 2)
        parts.append(block.reshape(-1))
    return torch.cat(parts)


def _inputs(B, G, H, seed, **dims):
    return step_inputs(B, G, H, torch.bfloat16, torch.Generator().manual_seed(seed), **dims)


@needs_brgemm
@pytest.mark.parametrize("T,R,H", [(3, 128, 64), (3, 20, 32), (2, 40, 130), (1, 7, 4096),
                                   (3, 256, 96)])
def test_packing_is_the_documented_layout(T, R, H):
    """_pack_bf16_split writes exactly the layout the module documents (and that the library
    checked against oneDNN's own packing when it loaded): blocks of 64 rows, a last block of any
    width padded to 16 with zeros."""
    split = torch.randn(T, R, H, generator=torch.Generator().manual_seed(R)).bfloat16()
    out = torch.full((packed_numel(T * R, H),), 7.0, dtype=torch.bfloat16)
    torch.ops.care_ext._pack_bf16_split(split, out)
    assert torch.equal(out.view(torch.int16), _layout(split))


@needs_brgemm
@pytest.mark.parametrize("B,G,H,dims", [(0, 8, 64, {}), (1, 1, 32, {}), (7, 5, 130, {}),
                                        (64, 8, 256, {}), (33, 16, 130, {}), (5, 64, 64, {}),
                                        (3, 8, 4096, {}), (70, 8, 96, dict(P=24, R1=20)),
                                        (40, 8, 64, dict(P=100, R1=36))])
def test_packed_split_step_matches_composition(B, G, H, dims):
    """The CPU split step on packed pieces (BRGeMM) against the float64 composition, as tight as
    the float32 path; rollout units not a multiple of 64 (a last block narrower than 64)."""
    ids, lengths, h_p, h_r, s1, s2 = _inputs(B, G, H, B * G + H, **dims)
    split = first_layer_split(s1, s2, H)
    packed = pack_first_layer_split(split)
    assert packed is not None and [p.numel() for p in packed] == [
        packed_numel(t.shape[0] * t.shape[1], H) for t in split]
    got = run_step("_acquisition_step_split", "cpu", ids, lengths, h_p, h_r, s1, s2,
                   split + packed)
    assert_step_like_reference(got, ids, lengths, h_p, h_r, s1, s2)


@needs_brgemm
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_packed_split_step_reads_strided_states_on_any_thread_count(threads):
    """Strided hidden states (rows 2H apart, NaN between them) and 1-3 threads: blocks of rows in
    parallel (each multiplying on its own thread) or one after the other with the BRGeMM tasks
    spread over the threads; the reference's results every time."""
    B, G, H = 100, 8, 64
    ids, lengths, h_p, h_r, s1, s2 = _inputs(B, G, H, 5)
    wide = torch.full((B, G, 2 * H), float("nan"), dtype=torch.bfloat16)
    wide[..., :H] = h_r
    split = first_layer_split(s1, s2, H)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run_step("_acquisition_step_split", "cpu", ids, lengths, h_p, wide[..., :H], s1, s2,
                       split + pack_first_layer_split(split))
    finally:
        torch.set_num_threads(old)
    assert_step_like_reference(got, ids, lengths, h_p, h_r, s1, s2)


@needs_brgemm
def test_packed_pieces_are_what_the_step_multiplies():
    """The step reads the packed pieces, not the plain ones, when given 4 tensors: packing other
    weights changes the first layers' products (and so the logits)."""
    B, G, H = 16, 8, 64
    ids, lengths, h_p, h_r, s1, s2 = _inputs(B, G, H, 9)
    split = first_layer_split(s1, s2, H)
    other = first_layer_split([w * 2 for w in s1], [w * 2 for w in s2], H)
    plain = run_step("_acquisition_step_split", "cpu", ids, lengths, h_p, h_r, s1, s2, split)
    mixed = run_step("_acquisition_step_split", "cpu", ids, lengths, h_p, h_r, s1, s2,
                     split + pack_first_layer_split(other))
    i = 3  # stage1_logits
    assert not torch.allclose(plain[i], mixed[i], rtol=1e-3, atol=1e-3)


@needs_brgemm
def test_packed_pieces_are_ignored_while_mkldnn_is_disabled():
    """torch's BRGeMM runs only with torch.backends.mkldnn enabled; with it disabled the step
    multiplies the plain pieces with MKL (the same results as the 2-piece call) instead of failing."""
    B, G, H = 16, 8, 64
    ids, lengths, h_p, h_r, s1, s2 = _inputs(B, G, H, 9)
    split = first_layer_split(s1, s2, H)
    other = pack_first_layer_split(first_layer_split([w * 2 for w in s1], [w * 2 for w in s2], H))
    plain = run_step("_acquisition_step_split", "cpu", ids, lengths, h_p, h_r, s1, s2, split)
    with torch.backends.mkldnn.flags(enabled=False):
        got = run_step("_acquisition_step_split", "cpu", ids, lengths, h_p, h_r, s1, s2,
                       split + other)  # packed pieces of other weights: provably not read
    for a, b in zip(plain, got, strict=True):
        assert torch.equal(a, b)


@needs_brgemm
def test_pack_reuses_its_buffers_and_checks_them():
    gen = torch.Generator().manual_seed(3)
    split = [torch.randn(3, 40, 64, generator=gen).bfloat16(),
             torch.randn(3, 70, 64, generator=gen).bfloat16()]
    first = pack_first_layer_split(split)
    ptrs = [p.data_ptr() for p in first]
    split2 = [s * 3 for s in split]
    again = pack_first_layer_split(split2, out=first)
    assert [p.data_ptr() for p in again] == ptrs
    for got, want in zip(again, pack_first_layer_split(split2), strict=True):
        assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    with pytest.raises(ValueError, match="out must hold 2"):
        pack_first_layer_split(split, out=first[:1])
    with pytest.raises(ValueError, match=r"out\[1\] must be a contiguous bfloat16"):
        pack_first_layer_split(split, out=[first[0], first[1][:-1]])
    with pytest.raises(ValueError, match=r"split\[0\] must be bfloat16"):
        pack_first_layer_split([split[0].float(), split[1]])
    assert pack_first_layer_split([s[..., :63] for s in split]) is None  # odd H: not packable


@needs_brgemm
def test_pack_op_and_step_argument_errors():
    op = torch.ops.care_ext._pack_bf16_split
    s = torch.zeros(3, 40, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="out must be a contiguous bfloat16"):
        op(s, torch.empty(packed_numel(120, 64) - 1, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="H must be even"):
        op(torch.zeros(3, 40, 63, dtype=torch.bfloat16), torch.empty(10, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="split must be bfloat16"):
        op(s.float(), torch.empty(packed_numel(120, 64), dtype=torch.bfloat16))
    B, G, H = 4, 8, 32
    ids, lengths, h_p, h_r, s1, s2 = _inputs(B, G, H, 2)
    split = first_layer_split(s1, s2, H)
    packed = pack_first_layer_split(split)
    for bad, msg in [(split + packed[:1], "must hold 2 tensors.*or 4"),
                     (split + [packed[0], packed[1][:-16]], r"first_layer_split\[3\] \(prompt, "
                                                           r"packed\) must be the contiguous")]:
        with pytest.raises(RuntimeError, match=msg):
            run_step("_acquisition_step_split", "cpu", ids, lengths, h_p, h_r, s1, s2, bad)
    with pytest.raises(RuntimeError, match="must hold 2 tensors"):  # the fused op takes no packing
        run_step("_acquisition_step_fused_split", "cpu", ids, lengths, h_p, h_r, s1, s2,
                 split + packed)


def test_packing_switch_and_availability():
    """CARE_EXT_CPU_BRGEMM=0 turns the packed path off (build_info's cpu_brgemm false, no
    packing, packed pieces refused); otherwise cpu_brgemm says whether the CPU has AMX-BF16."""
    code = (
        "import json, torch, care_ext\n"
        "from care_ext.bf16_split import first_layer_split, pack_first_layer_split\n"
        "from care_ext.bf16_split import cpu_brgemm_available\n"
        "s = torch.zeros(3, 40, 64, dtype=torch.bfloat16)\n"
        "info = json.loads(torch.ops.care_ext.build_info())\n"
        "print(json.dumps([info['cpu_brgemm'], cpu_brgemm_available(),\n"
        "                  pack_first_layer_split([s, s]) is None]))\n")
    env = dict(os.environ, CARE_EXT_CPU_BRGEMM="0")
    # cwd "/": the installed package, not a source tree without its compiled library
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd="/", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [False, False, True]
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if "amx_bf16" not in flags:  # no AMX: never available, whatever the switch
        assert not cpu_brgemm_available()
    elif "CARE_EXT_CPU_BRGEMM" not in os.environ and torch.backends.mkldnn.is_available():
        # AMX and oneDNN: available, unless the layout check against oneDNN's packing failed
        # (which would turn the packed path off silently and skip the tests above)
        assert cpu_brgemm_available()


@pytest.mark.skipif(cpu_brgemm_available(), reason="this CPU has the packed path")
def test_without_amx_packing_is_refused():
    """On a CPU without AMX (or with the switch off) there is no packing to pass, and packed
    pieces given anyway are refused with the reason."""
    B, G, H = 4, 8, 32
    ids, lengths, h_p, h_r, s1, s2 = _inputs(B, G, H, 2)
    split = first_layer_split(s1, s2, H)
    assert pack_first_layer_split(split) is None
    fake = [torch.zeros(packed_numel(t.shape[0] * t.shape[1], H), dtype=torch.bfloat16)
            for t in split]
    with pytest.raises(RuntimeError, match="no AMX bf16 BRGeMM"):
        run_step("_acquisition_step_split", "cpu", ids, lengths, h_p, h_r, s1, s2, split + fake)


@needs_brgemm
def test_opcheck_packing_and_the_packed_step():
    """torch.library.opcheck (schema, fake tensors, AOT dispatch) on _pack_bf16_split and on the
    split step given packed pieces."""
    B, G, H = 5, 8, 24
    ids, lengths, h_p, h_r, s1, s2 = _inputs(B, G, H, 1, P=8, R1=4, R2=8, K=6)
    split = first_layer_split(s1, s2, H)
    out = torch.empty(packed_numel(split[1].shape[0] * split[1].shape[1], H), dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.care_ext._pack_bf16_split.default, (split[1], out))
    torch.library.opcheck(torch.ops.care_ext._acquisition_step_split.default,
                          (ids, lengths, h_p, h_r, s1, s2, 50.0, 0.0, False, 1e-6, False,
                           split + pack_first_layer_split(split)))


@needs_brgemm
def test_packed_step_does_not_depend_on_the_thread_count():
    """The packed step gives the same bits on 1, 2 and 3 threads (blocks of rows in parallel or
    one after the other, the prompts' BRGeMM tasks spread over the threads), like every CPU
    kernel (test_ops_opcheck)."""
    cases = []
    for B, G in ((37, 8), (300, 4)):
        ids, lengths, h_p, h_r, s1, s2 = _inputs(B, G, 24, B, P=8, R1=4, R2=8, K=6)
        split = first_layer_split(s1, s2, 24)
        cases.append((ids, lengths, h_p, h_r, s1, s2, split + pack_first_layer_split(split)))
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append([t for c in cases for t in run_step("_acquisition_step_split", "cpu", *c)])
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other, strict=True))
