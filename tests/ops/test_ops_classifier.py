"""group_features, classifier_forward and the acquisition step (public and private fused) against
the reference twins."""
from __future__ import annotations

import re

import pytest
import torch

import care_ext

from ops_testutil import (B_GRID, G_GRID, R, assert_close, assert_exact, assert_like_torch,
                          assert_step_like_reference, random_ids, random_weights, run_step,
                          step_inputs, to64)

pytestmark = pytest.mark.native


def _lengths(B, G, gen):
    return torch.randint(0, 6000, (B, G), generator=gen)


@pytest.mark.parametrize("G", G_GRID)
@pytest.mark.parametrize("B", B_GRID)
def test_group_features_grid(device, B, G):
    gen = torch.Generator().manual_seed(B * 5 + G)
    ids, lengths = random_ids(B, G, gen), _lengths(B, G, gen)
    got = torch.ops.care_ext.group_features(ids.to(device), lengths.to(device), 4000.0, 0.0, False,
                                            1e-6, True)
    ref = R.group_features(ids, lengths, 4000.0, 0.0, False, 1e-6, True, dtype=torch.float64)
    for name, g, r in zip(R.GroupFeatures._fields, got, ref):
        if r.dtype in (torch.int64, torch.bool):
            assert_exact(g, r, name)
        else:
            assert g.dtype == torch.float32, name
            assert_close(g, r, name)


def test_group_features_length_dtypes(device):
    gen = torch.Generator().manual_seed(1)
    ids = random_ids(9, 8, gen)
    lengths = _lengths(9, 8, gen)
    outs = [torch.ops.care_ext.group_features(ids.to(device), lengths.to(dt).to(device), 1000.0,
                                              0.0, False, 1e-6, False)[3]
            for dt in (torch.int64, torch.int32, torch.float32, torch.float64)]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    assert float(outs[0].max()) <= 1.0 and float(outs[0].min()) >= 0.0


def _length_cases(B, G, gen):
    """Lengths in every dtype the ops take, whose float32 conversion rounds: int64 values that
    an int64 -> float64 -> float32 path rounds differently (2^60 + 2^36 + 1), float64 values
    between float32 neighbours, negatives (clamped to 0), and the dtypes converted on the host."""
    big = torch.tensor([2**60 + 2**36 + 1, 2**62 + 2**38 + 1, 2**24 + 1, -5, 0, 7])
    i64 = big[torch.randint(0, len(big), (B, G), generator=gen)]
    i64 = i64 + torch.randint(0, 3, (B, G), generator=gen) * 2**40
    f64 = torch.rand(B, G, generator=gen, dtype=torch.float64) * 2e18 - 1e17
    small = torch.randint(-3, 300, (B, G), generator=gen)
    yield "int64", i64
    yield "int64, non-contiguous", i64.t().contiguous().t()
    yield "int32", (i64 % 2**31).to(torch.int32)
    yield "float64", f64
    yield "float32", f64.float()
    for dt in (torch.float16, torch.bfloat16, torch.int16, torch.uint8):
        yield str(dt), small.clamp(min=0).to(dt) if dt == torch.uint8 else small.to(dt)


def test_group_features_reads_every_length_dtype_as_its_float32_copy(device):
    """group_features (and so every step) reads int64/int32/float64/float32 lengths in place and
    converts each value as lengths.to(torch.float32) does: all nine outputs equal the bits of a
    call on the float32 copy, for values whose conversion rounds."""
    gen = torch.Generator().manual_seed(3)
    B, G = 37, 8
    ids = random_ids(B, G, gen).to(device)
    for name, lengths in _length_cases(B, G, gen):
        lengths = lengths.to(device)
        got = torch.ops.care_ext.group_features(ids, lengths, 2.0**63, 0.0, False, 1e-6, True)
        want = torch.ops.care_ext.group_features(ids, lengths.to(torch.float32), 2.0**63, 0.0,
                                                 False, 1e-6, True)
        for field, g, w in zip(R.GroupFeatures._fields, got, want):
            assert torch.equal(g, w), f"{name}: {field}"
        assert 0.0 < float(got[3].max()) < 1.0, name  # unclamped: the rounding shows


def test_step_reads_int64_lengths_as_their_float32_copy(device):
    gen = torch.Generator().manual_seed(4)
    ids, _, h_p, h_r, s1, s2 = step_inputs(5, 8, 32, torch.float32, gen)
    lengths = next(_length_cases(5, 8, gen))[1]
    args = lambda ln: (ids.to(device), ln.to(device), h_p.to(device), h_r.to(device),  # noqa: E731
                       [w.to(device) for w in s1], [w.to(device) for w in s2], 2.0**63, 0.0,
                       False, 1e-6, True)
    got = torch.ops.care_ext.acquisition_step(*args(lengths))
    want = torch.ops.care_ext.acquisition_step(*args(lengths.float()))
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), i


@pytest.mark.parametrize("lanes", [2, 3, 32, 70])
@pytest.mark.parametrize("G", [1, 2, 8, 33, 64])
def test_group_features_split_over_lanes_gives_the_same_bits(G, lanes):
    """The CUDA kernel spreads a prompt's features over the 32 lanes of a warp (two phases around
    a __syncwarp); the private CPU op runs that division lane by lane. Every output equals
    group_features' bit for bit, whatever the number of lanes (more lanes than responses too),
    including rows with many equal cluster sizes (lanes writing the same class) and every
    convention."""
    gen = torch.Generator().manual_seed(G * 7 + lanes)
    ids = torch.cat([random_ids(40, G, gen), random_ids(10, G, gen, p_invalid=0.0) % 3,
                     torch.full((2, G), -1)])  # invalid rows, few large clusters, many small
    lengths = _lengths(ids.shape[0], G, gen)
    for conv in [(4000.0, 0.0, False, 1e-6, True), (300.0, 1e-3, True, 0.0, False)]:
        want = torch.ops.care_ext.group_features(ids, lengths, *conv)
        got = torch.ops.care_ext._group_features_lanes(ids, lengths, *conv, lanes)
        for name, g, w in zip(R.GroupFeatures._fields, got, want):
            assert g.dtype == w.dtype and torch.equal(g, w), (name, conv)


def test_group_features_lanes_checks_its_lanes():
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"lanes must be in \[1, 1024\], got 0"):
        torch.ops.care_ext._group_features_lanes(ids, torch.ones(2, 4), 10.0, 0.0, False, 0.0,
                                                 False, 0)


def _classifier_case(B, G, H, dtype, gen, device, masked, with_feat):
    h_p = torch.randn(B, H, generator=gen).to(dtype)
    h_r = torch.randn(B, G, H, generator=gen).to(dtype)
    Fp, Fr = G + 1, (1 if with_feat else 0)
    pf = torch.rand(B, Fp, generator=gen)
    rf = torch.rand(B, G, Fr, generator=gen) if with_feat else None
    mask = (torch.rand(B, G, generator=gen) < 0.5) if masked else None
    w = random_weights(H, Fp, Fr, G + 1, gen)
    got = torch.ops.care_ext.classifier_forward(
        h_p.to(device), pf.to(device), h_r.to(device), None if rf is None else rf.to(device),
        None if mask is None else mask.to(device), [t.to(device) for t in w])
    ref64 = R.classifier_forward(h_p, pf, h_r, rf, mask, to64(w))
    ref32 = R.classifier_forward(h_p, pf, h_r, rf, mask, w)
    return got, ref32, ref64


@pytest.mark.parametrize("masked,with_feat", [(False, True), (True, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,G,H", [(0, 8, 64), (1, 1, 64), (7, 5, 130), (64, 8, 64),
                                   (16, 16, 2048), (4, 64, 130), (3, 8, 4096)])
def test_classifier_forward(device, B, G, H, dtype, masked, with_feat):
    gen = torch.Generator().manual_seed(B + G + H)
    got, ref32, ref64 = _classifier_case(B, G, H, dtype, gen, device, masked, with_feat)
    assert_like_torch(got, ref32, ref64, "logits")


def test_classifier_forward_non_contiguous(device):
    gen = torch.Generator().manual_seed(4)
    B, G, H = 6, 8, 96
    h_p = torch.randn(H, B, generator=gen).T  # transposed view
    h_r = torch.randn(B, 2 * G, H, generator=gen)[:, ::2]
    pf = torch.rand(B, G + 1, generator=gen)
    w = random_weights(H, G + 1, 0, 3, gen)
    w[0] = torch.randn(H + G + 1, 128, generator=gen).T / 10  # non-contiguous weight
    assert not (h_p.is_contiguous() or h_r.is_contiguous() or w[0].is_contiguous())
    got = torch.ops.care_ext.classifier_forward(h_p.to(device), pf.to(device), h_r.to(device),
                                                None, None, [t.to(device) for t in w])
    assert_like_torch(got, R.classifier_forward(h_p, pf, h_r, None, None, w),
                       R.classifier_forward(h_p, pf, h_r, None, None, to64(w)), "non-contiguous")


def test_empty_mask_row_pools_to_zero(device):
    gen = torch.Generator().manual_seed(8)
    B, G, H = 2, 4, 32
    w = random_weights(H, 1, 0, 2, gen)
    h_p, h_r, pf = torch.randn(B, H), torch.randn(B, G, H), torch.rand(B, 1)
    mask = torch.tensor([[False] * 4, [True, False, True, False]])
    got = torch.ops.care_ext.classifier_forward(h_p.to(device), pf.to(device), h_r.to(device), None,
                                                mask.to(device), [t.to(device) for t in w])
    # row 0 must equal a forward whose pooled vector is zero: change its rollouts, same result
    h_r2 = h_r.clone()
    h_r2[0] = torch.randn(G, H)
    got2 = torch.ops.care_ext.classifier_forward(h_p.to(device), pf.to(device), h_r2.to(device),
                                                 None, mask.to(device), [t.to(device) for t in w])
    assert torch.equal(got[0], got2[0])
    assert_close(got, R.classifier_forward(h_p, pf, h_r, None, mask, to64(w)), "masked",
                 rtol=1e-4, atol=1e-5)


STEP_OPS = ["acquisition_step", "_acquisition_step_fused"]
"""The public step and the private fused one (first-layer GEMMs + one per-prompt tail: a CUDA
kernel, or on the CPU the same arithmetic on one thread per prompt), same semantics."""


@pytest.mark.parametrize("op", STEP_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,G,H", [(0, 8, 64), (1, 1, 32), (7, 5, 130), (64, 8, 256),
                                   (33, 16, 130), (5, 64, 64), (3, 8, 4096)])
def test_acquisition_step_matches_composition(device, B, G, H, dtype, op):
    gen = torch.Generator().manual_seed(B * G + H)
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(B, G, H, dtype, gen)
    got = run_step(op, device, ids, lengths, h_p, h_r, s1, s2)
    assert_step_like_reference(got, ids, lengths, h_p, h_r, s1, s2)


@pytest.mark.parametrize("op", STEP_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["columns-strided", "rows-strided"])
def test_step_reads_hidden_states_through_their_strides(device, dtype, layout, op):
    """Rollout hidden states as a view whose [B*G, H] rows are not packed: a transposed buffer
    (column stride B*G: the CPU step converts such rows element by element) or every other row of
    a larger one (row stride 2H); 33 prompts of 16 make three CPU blocks, the last one partial."""
    gen = torch.Generator().manual_seed(31)
    B, G, H = 33, 16, 72
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(B, G, H, dtype, gen)
    if layout == "columns-strided":
        h_view = h_r.reshape(B * G, H).t().contiguous().t().reshape(B, G, H)
        assert h_view.reshape(B * G, H).stride() == (1, B * G)
    else:
        big = torch.full((B, G, 2, H), float("nan"), dtype=dtype)
        big[:, :, 0] = h_r
        h_view = big[:, :, 0]
        assert h_view.reshape(B * G, H).stride() == (2 * H, 1)
    got = run_step(op, device, ids, lengths, h_p, h_view, s1, s2)
    assert_step_like_reference(got, ids, lengths, h_p, h_r, s1, s2)


def _weight_layout(ws, layout):
    """The same weights stored row-major, column-major (care_ext.ops.fused_step_layout: the CUDA
    tail's coalesced layout) or as strided views into larger buffers (row stride > columns)."""
    import care_ext.ops as ops

    if layout == "row":
        return [w.contiguous() for w in ws]
    if layout == "column":
        out = ops.fused_step_layout(ws)
        assert all(not out[i].is_contiguous() and out[i].t().is_contiguous() for i in range(0, 10, 2))
        return out
    out = list(ws)
    for i in range(0, 10, 2):
        big = torch.full((ws[i].shape[0] + 3, ws[i].shape[1] + 5), float("nan"))
        big[1:-2, 2:-3] = ws[i]
        out[i] = big[1:-2, 2:-3]
    return out


@pytest.mark.parametrize("op", STEP_OPS + ["_acquisition_step_fused_split"])
@pytest.mark.parametrize("layout", ["row", "column", "strided"])
@pytest.mark.parametrize("B,G,H", [(1, 1, 32), (33, 16, 130), (5, 64, 64)])
def test_step_reads_weights_through_their_strides(device, B, G, H, layout, op):
    """The fused step's tail reads weight matrices in place through their strides (no copies);
    column-major and strided views (NaN around them: a wrong stride reads NaN) give the reference's
    results, and the tail's arithmetic order does not depend on the layout."""
    from care_ext.bf16_split import first_layer_split

    gen = torch.Generator().manual_seed(B + G + H)
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(B, G, H, torch.bfloat16, gen)
    split = first_layer_split(s1, s2, H) if op.endswith("_split") else None
    got = run_step(op, device, ids, lengths, h_p, h_r, _weight_layout(s1, layout),
                   _weight_layout(s2, layout), split)
    assert_step_like_reference(got, ids, lengths, h_p, h_r, s1, s2)
    if split is not None:  # the GEMMs read the split pieces: the layout reaches the tail only
        row = run_step(op, device, ids, lengths, h_p, h_r, s1, s2, split)
        assert all(torch.equal(g, r) for g, r in zip(got, row)), layout


def _side_by_side(w1, w2, stage1_first):
    """Both stages' first layers (prompt_w, resp1_w) as views of one row-major buffer each, as
    care_ext.ops.shared_first_layers stores them (``stage1_first``) or with Stage-II's columns
    first; NaN in the buffer cells outside both views (a read past a view returns NaN)."""
    w1, w2 = list(w1), list(w2)
    for i in (0, 2):
        a, b = (w1[i], w2[i]) if stage1_first else (w2[i], w1[i])
        buf = torch.full((max(a.shape[1], b.shape[1]) + 1, a.shape[0] + b.shape[0] + 2),
                         float("nan"))
        buf[: a.shape[1], : a.shape[0]] = a.t()
        buf[: b.shape[1], a.shape[0]: a.shape[0] + b.shape[0]] = b.t()
        va = buf[: a.shape[1], : a.shape[0]].t()
        vb = buf[: b.shape[1], a.shape[0]: a.shape[0] + b.shape[0]].t()
        w1[i], w2[i] = (va, vb) if stage1_first else (vb, va)
    return w1, w2


@pytest.mark.parametrize("stage1_first", [True, False])
@pytest.mark.parametrize("B,G,H,unanimous", [(1, 1, 32, 0), (33, 16, 130, 0), (5, 64, 64, 0),
                                            (70, 8, 96, 32), (9, 8, 48, 9)])
def test_step_with_both_first_layers_in_one_buffer(device, B, G, H, unanimous, stage1_first):
    """Both stages' first layers side by side in one buffer (the CARE core's CPU layout): the CPU
    step multiplies Stage-II's rollouts by both stages' columns in one GEMM and the prompts by both
    in another, and still gives the reference's results -- with Stage-I's columns first or second,
    blocks without any Stage-II row (the first ``unanimous`` prompts answer alike: 32 prompts of
    8 fill the first block), and NaN in the buffer around the views."""
    gen = torch.Generator().manual_seed(B + G + H + unanimous)
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(B, G, H, torch.bfloat16, gen)
    ids[:unanimous] = 0
    w1, w2 = _side_by_side(s1, s2, stage1_first)
    assert w1[2].untyped_storage().data_ptr() == w2[2].untyped_storage().data_ptr()
    got = run_step("acquisition_step", device, ids, lengths, h_p, h_r, w1, w2)
    assert_step_like_reference(got, ids, lengths, h_p, h_r, s1, s2)


def test_shared_first_layers_and_core_step_layout(monkeypatch):
    """shared_first_layers keeps every value and shape, puts both stages' prompt_w and resp1_w
    into one buffer each (Stage-I's columns first) and leaves the rest alone; core_step_layout
    uses it on the CPU from SHARED_LAYOUT_MIN_HIDDEN on where the step runs MKL, keeps the weights
    as they are where the step packs them for the AVX2 GEMM (CARE_EXT_CPU_GEMM=avx2, or auto where
    build_info says so), and keeps smaller models (the CPU lab) row-major."""
    import care_ext.ops as ops

    gen = torch.Generator().manual_seed(0)
    s1, s2 = random_weights(48, 9, 1, 2, gen), random_weights(48, 9, 0, 9, gen)
    w1, w2 = ops.shared_first_layers(s1, s2)
    assert all(torch.equal(a, b) for a, b in zip(w1 + w2, s1 + s2))
    for i in (0, 2):
        assert w1[i].untyped_storage().data_ptr() == w2[i].untyped_storage().data_ptr()
        assert w1[i].stride() == w2[i].stride() == (1, s1[i].shape[0] + s2[i].shape[0])
        assert w2[i].storage_offset() - w1[i].storage_offset() == s1[i].shape[0]
    assert all(w1[i] is s1[i] and w2[i] is s2[i] for i in range(10) if i not in (0, 2))
    with pytest.raises(ValueError, match="10 folded weights per stage, got 10 and 9"):
        ops.shared_first_layers(s1, s2[:9])
    with pytest.raises(ValueError, match=r"weights\[2\] \(resp1_w\) must be 2-D"):
        ops.shared_first_layers(s1[:2] + [s1[2].flatten()] + s1[3:], s2)
    big_h = ops.SHARED_LAYOUT_MIN_HIDDEN
    for env in ("mkl", "avx2", "auto"):
        monkeypatch.setenv("CARE_EXT_CPU_GEMM", env)
        small = ops.core_step_layout(s1, s2, 48)
        assert all(a is b for a, b in zip(small[0] + small[1], s1 + s2))
        big = ops.core_step_layout(s1, s2, big_h)
        packs = env == "avx2" or (env == "auto" and care_ext.build_info()["cpu_f32_gemm"] == "avx2")
        assert ops.cpu_step_packs_weights(big_h) is packs
        assert ops.cpu_step_packs_weights(48) is (env == "avx2")  # auto: only from 1024 on
        if packs:
            assert all(a is b for a, b in zip(big[0] + big[1], s1 + s2))
        else:
            assert big[0][2].untyped_storage().data_ptr() == big[1][2].untyped_storage().data_ptr()


@pytest.mark.parametrize("op", ["_acquisition_step_fused", "_acquisition_step_fused_split"])
def test_step_reads_weights_spread_past_32_bit_offsets(tmp_path, op):
    """The tail addresses weights with 32-bit offsets (Mat in step_tail.h); a view whose rows lie
    2^31 floats apart (Stage-I's head layer 2, 2 rows, in a sparse 8 GB file mapped copy-on-write:
    only touched pages cost memory) is read from a contiguous copy instead and gives the
    reference's results (without the copy, row 1's offset wraps to a negative int)."""
    from care_ext.bf16_split import first_layer_split

    gen = torch.Generator().manual_seed(7)
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(5, 8, 40, torch.bfloat16, gen)
    split = first_layer_split(s1, s2, 40) if op.endswith("_split") else None
    rows, cols = s1[8].shape
    n = (rows - 1) * 2**31 + cols
    with open(tmp_path / "spread.bin", "wb") as f:
        f.truncate(4 * n)
    spread = torch.from_file(str(tmp_path / "spread.bin"), shared=False, size=n,
                             dtype=torch.float32)
    w1 = list(s1)
    w1[8] = spread.as_strided((rows, cols), (2**31, 1)).copy_(s1[8])
    got = run_step(op, "cpu", ids, lengths, h_p, h_r, w1, s2, split)
    assert_step_like_reference(got, ids, lengths, h_p, h_r, s1, s2)


ODD = {"P": 13, "R1": 7, "R2": 19, "K": 11}  # layer sizes off the tail's tiles and chunks


@pytest.mark.parametrize("staged", ["", "CARE_EXT_TAIL_STAGE_R2", "CARE_EXT_TAIL_STAGE_H2",
                                    "CARE_EXT_TAIL_DOT_AHEAD"],
                         ids=["in-place", "r2w-staged", "h2w-staged", "dot-ahead"])
@pytest.mark.parametrize("split", [False, True], ids=["fp32", "split"])
@pytest.mark.parametrize("G, threads, prompts, dims", [
    (3, 2, 1, {}), (8, 5, 1, {}), (8, 256, 1, {}), (64, 32, 1, {}), (64, 256, 1, {}),
    (16, 7, 1, ODD), (16, 256, 1, ODD), (8, 9, 1, {"P": 70, "R2": 100, "K": 300}),
    (3, 3, 4, {}), (8, 5, 3, {}), (8, 256, 4, {}), (64, 256, 2, {}), (64, 256, 4, {}),
    (16, 7, 4, ODD), (16, 256, 2, ODD)])
def test_fused_step_tail_over_a_block_of_threads_gives_the_same_bits(G, threads, prompts, dims,
                                                                      split, staged, monkeypatch):
    """The CUDA kernel runs the tail of one prompt, or of several (CARE_EXT_TAIL_PROMPTS), on a
    block of 256 threads that divide every loop among themselves and meet at __syncthreads. The
    private CPU op runs that division with a real team of threads and a barrier at each sync (one
    scratch per block, as shared memory): every output equals the one-thread CPU op's bit for bit
    (each sum keeps its order whoever computes it and however many prompts share a block), for 2
    to 256 threads, 1 to 4 prompts per block (5 prompts: a short last block), layer sizes off the
    tiles, and both first-layer paths. With CARE_EXT_TAIL_STAGE_R2=1 each block first copies its
    rollout layer-2 weight k-major into a buffer of its own (the kernel: shared memory) and reads
    it there, with CARE_EXT_TAIL_STAGE_H2=1 its head layer-2 weight (one prompt per block); with
    CARE_EXT_TAIL_DOT_AHEAD=1 the one-prompt tail's head loads each chunk of weights before the
    previous chunk's multiply-adds: the same bits again."""
    from care_ext.bf16_split import first_layer_split

    gen = torch.Generator().manual_seed(G * 31 + threads)
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(5, G, 40, torch.bfloat16, gen, **dims)
    ids[1] = -1  # a prompt with no valid answer: empty masks, no admissible class but 0
    pieces = first_layer_split(s1, s2, 40) if split else []
    one = run_step("_acquisition_step_fused_split" if split else "_acquisition_step_fused", "cpu",
                   ids, lengths, h_p, h_r, s1, s2, pieces if split else None)
    monkeypatch.setenv("CARE_EXT_TAIL_STAGE_H2", "0")  # on by default: off unless asked here
    if staged:
        monkeypatch.setenv(staged, "1")
    many = run_step("_acquisition_step_fused_block", "cpu", ids, lengths, h_p, h_r, s1, s2, pieces,
                    threads, prompts)
    for k, (a, b) in enumerate(zip(many, one)):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("split", [False, True], ids=["fp32", "split"])
@pytest.mark.parametrize("B, G, threads, prompts, dims", [
    (5, 3, 7, 2, {}), (37, 8, 5, 3, {}), (18, 64, 32, 1, {}), (20, 16, 256, 4, ODD),
    (33, 8, 64, 4, {"K": 300}), (16, 5, 3, 1, ODD)])
def test_fused_step_head_split_off_the_tail_gives_the_same_bits(B, G, threads, prompts, dims,
                                                                 split, monkeypatch):
    """CARE_EXT_TAIL_HEAD=split: the tail blocks write each prompt's head input [p ; pool] to a
    buffer and zero the head's counters, and a head kernel of its own runs head layer 1 in blocks
    of 32 units x 16 prompts (each weight read once per 16 prompts instead of once per tail
    block, in chunks through shared memory), the last block of a group finishing head layer 2 and
    the stage's outputs (several prompts side by side, a team per prompt). The CPU block twin
    runs those blocks one after another with a team of threads: every output equals the
    one-thread CPU op's bit for bit (the same sums in the same order), for short last groups
    (37 = 2 x 16 + 5), K off the 32-unit blocks (11, 300), P and R2 off the 32-input chunks
    (ODD), tail blocks of 1 to 4 prompts (3: head groups starting inside a tail block) and both
    first-layer paths; the twin checks that every group's counter was zeroed by the tail."""
    from care_ext.bf16_split import first_layer_split

    gen = torch.Generator().manual_seed(B * 13 + G)
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(B, G, 40, torch.bfloat16, gen, **dims)
    ids[1] = -1  # a prompt with no valid answer: empty masks, no admissible class but 0
    pieces = first_layer_split(s1, s2, 40) if split else []
    one = run_step("_acquisition_step_fused_split" if split else "_acquisition_step_fused", "cpu",
                   ids, lengths, h_p, h_r, s1, s2, pieces if split else None)
    monkeypatch.setenv("CARE_EXT_TAIL_HEAD", "split")
    many = run_step("_acquisition_step_fused_block", "cpu", ids, lengths, h_p, h_r, s1, s2, pieces,
                    threads, prompts)
    for k, (a, b) in enumerate(zip(many, one)):
        assert torch.equal(a, b), k


@pytest.mark.cuda
@pytest.mark.parametrize("split", [False, True], ids=["fp32", "split"])
@pytest.mark.parametrize("B, G, dims", [(5, 3, {}), (300, 8, {}), (600, 64, {}), (40, 16, ODD),
                                        (33, 8, {"K": 300})])
def test_cuda_head_split_off_the_tail_gives_the_same_bits(B, G, dims, split, monkeypatch):
    """CARE_EXT_TAIL_HEAD=split on CUDA: the tail writes the head inputs and zeroes the counters,
    step_head_kernel runs head layer 1 in blocks of 32 units x up to 16 prompts (weights through
    shared memory by cp.async) and the last block of each group (atomic counter,
    __threadfence) finishes it, its prompts' outputs side by side. Every output equals the
    tail's own head bit for bit, for both weight layouts, short last groups, K off the unit
    blocks, 1 to 4 prompts per tail block (B picks them), and is like the float64 reference."""
    _assert_same_bits_under("CARE_EXT_TAIL_HEAD", ("tail", "split"), B, G, dims, split,
                            B * 11 + G, monkeypatch)


def test_tail_head_env_is_checked(monkeypatch):
    """CARE_EXT_TAIL_HEAD takes tail, split or nothing; anything else is an error naming it, on
    the block twin and on the per-prompt CPU twin (which keeps its head in the tail)."""
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(3, 8, 16, torch.bfloat16, torch.Generator())
    monkeypatch.setenv("CARE_EXT_TAIL_HEAD", "kernel")
    for op, more in (("_acquisition_step_fused_block", (8, 1)),
                     ("_acquisition_step_fused_split", ())):
        with pytest.raises(RuntimeError, match="CARE_EXT_TAIL_HEAD must be tail or split, got "
                                               "'kernel'"):
            run_step(op, "cpu", ids, lengths, h_p, h_r, s1, s2, [], *more)


@pytest.mark.parametrize("var", ["CARE_EXT_TAIL_STAGE_R2", "CARE_EXT_TAIL_STAGE_H2",
                                 "CARE_EXT_TAIL_STAMPS", "CARE_EXT_TAIL_DOT_AHEAD"])
def test_tail_switch_envs_are_checked(var, monkeypatch):
    """The tail's on/off switches take 0, 1 or nothing; anything else is an error naming the
    variable (the block twin reads them all, as the CUDA launch does)."""
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(2, 4, 16, torch.float32, torch.Generator())
    monkeypatch.setenv(var, "yes")
    with pytest.raises(RuntimeError, match=f"{var} must be 0 or 1, got 'yes'"):
        run_step("_acquisition_step_fused_block", "cpu", ids, lengths, h_p, h_r, s1, s2, [], 8, 1)


def _cuda_fused_step_under(var, values, B, G, dims, split, seed, monkeypatch):
    """The private fused CUDA step (split-bf16 or float32 first layers) on B x G inputs of H = 64
    (layer sizes ``dims``, generator ``seed``), run with the environment variable ``var`` set to
    each of ``values`` in turn, for row-major and for column-major (the core's) weights.

    Returns the CPU inputs (ids, lengths, h_prompt, h_resp, stage-I and stage-II weights: what
    assert_step_like_reference takes) and, per layout, (its name, the outputs per value)."""
    from care_ext.bf16_split import first_layer_split
    from care_ext.ops import fused_step_layout

    gen = torch.Generator().manual_seed(seed)
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(B, G, 64, torch.bfloat16, gen, **dims)
    pieces = first_layer_split(s1, s2, 64) if split else None
    op = "_acquisition_step_fused_split" if split else "_acquisition_step_fused"
    runs = []
    for layout in (list, fused_step_layout):
        w1, w2 = layout([t.cuda() for t in s1]), layout([t.cuda() for t in s2])
        outs = []
        for value in values:
            monkeypatch.setenv(var, value)
            outs.append(run_step(op, "cuda", ids, lengths, h_p, h_r, w1, w2, pieces))
        runs.append((layout.__name__, outs))
    return (ids, lengths, h_p, h_r, s1, s2), runs


def _assert_same_bits_under(var, values, B, G, dims, split, seed, monkeypatch, reference=True):
    """:func:`_cuda_fused_step_under`, then for both weight layouts: the outputs under every value
    of ``var`` equal the first value's bit for bit, and (``reference``) the last value's are like
    the float64 reference. Returns the runs."""
    inputs, runs = _cuda_fused_step_under(var, values, B, G, dims, split, seed, monkeypatch)
    for layout, (first, *others) in runs:
        for value, outs in zip(values[1:], others):
            for k, (a, b) in enumerate(zip(outs, first)):
                assert torch.equal(a, b), (layout, var, value, k)
        if reference:
            assert_step_like_reference(others[-1] if others else first, *inputs)
    return runs


@pytest.mark.cuda
@pytest.mark.parametrize("split", [False, True], ids=["fp32", "split"])
@pytest.mark.parametrize("B, G, dims", [(5, 3, {}), (300, 8, {}), (600, 64, {}), (40, 16, ODD)])
def test_cuda_tail_with_its_layer2_weight_staged_gives_the_same_bits(B, G, dims, split,
                                                                     monkeypatch):
    """CARE_EXT_TAIL_STAGE_R2=1: every block of the CUDA tail copies its rollout layer-2 weight
    into shared memory (opting in above 48 KB) and reads it there; same values in the same order,
    so every output equals the unstaged kernel's bit for bit, for row-major and column-major
    (the core's) weights and with 1 to 4 prompts per block (B picks them)."""
    _assert_same_bits_under("CARE_EXT_TAIL_STAGE_R2", ("0", "1"), B, G, dims, split, B + G,
                            monkeypatch)


@pytest.mark.cuda
@pytest.mark.parametrize("split", [False, True], ids=["fp32", "split"])
@pytest.mark.parametrize("B, G, dims", [(5, 3, {}), (64, 8, {}), (100, 16, {}), (40, 16, ODD),
                                        (33, 8, {"K": 300}), (300, 8, {})])
def test_cuda_tail_with_its_head_layer2_weight_staged_gives_the_same_bits(B, G, dims, split,
                                                                          monkeypatch):
    """CARE_EXT_TAIL_STAGE_H2=1 (the default; unset is 1): every block of the one-prompt CUDA tail issues cp.async copies of
    its head layer-2 weight into shared memory at its start and head layer 2 reads it there (with
    4 prompts per block, B = 300, and where it does not fit, the launch leaves it in place); same
    values in the same order, so every output equals the unstaged kernel's bit for bit, for
    row-major and column-major weights, K off the 32-input chunks and both first-layer paths."""
    _assert_same_bits_under("CARE_EXT_TAIL_STAGE_H2", ("0", "1", ""), B, G, dims, split,
                            B * 3 + G, monkeypatch)


@pytest.mark.cuda
@pytest.mark.parametrize("split", [False, True], ids=["fp32", "split"])
@pytest.mark.parametrize("B, G, dims", [(5, 3, {}), (64, 8, {}), (40, 16, ODD),
                                        (33, 8, {"K": 300, "P": 70}), (300, 8, {})])
def test_cuda_tail_with_its_head_dots_ahead_gives_the_same_bits(B, G, dims, split, monkeypatch):
    """CARE_EXT_TAIL_DOT_AHEAD=1: the one-prompt tail (B = 300 runs 4 per block: not affected)
    loads each head chunk of 32 weights before the previous chunk's multiply-adds; the same
    multiply-adds in the same order, so every output equals the plain kernel's bit for bit, with
    inputs of 1 to 10 chunks and a rest (ODD, K = 300, P = 70), for both weight layouts and both
    first-layer paths."""
    _assert_same_bits_under("CARE_EXT_TAIL_DOT_AHEAD", ("0", "1"), B, G, dims, split,
                            B * 5 + G, monkeypatch)


@pytest.mark.cuda
@pytest.mark.parametrize("head", ["tail", "split"])
def test_cuda_tail_stamps_print_each_phase_and_change_nothing(head, capfd, monkeypatch):
    """CARE_EXT_TAIL_STAMPS=1: after the tail the launch prints, per stage, the median and slowest
    block of each phase in cycles and microseconds (the split head's tail: its branches and the
    block only); the outputs are the unstamped kernel's bits."""
    monkeypatch.setenv("CARE_EXT_TAIL_HEAD", head)
    runs = _assert_same_bits_under("CARE_EXT_TAIL_STAMPS", ("0", "1"), 12, 8, {}, True, 4,
                                   monkeypatch, reference=False)
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "care_ext tail stamps" in ln]
    assert len(lines) == 2 * len(runs), lines  # one per stage and stamped call
    phases = ["branches", "head-layer1", "head-layer2", "outputs", "block"]
    if head == "split":
        phases = ["branches", "block"]
    for ln in lines:
        assert "B=12 G=8 prompts/block=1" in ln, ln
        got = re.findall(r" ([a-z0-9-]+) (\d+)/(\d+) \(", ln)
        assert [g[0] for g in got] == phases, ln
        for _, med, mx in got:
            assert 0 < int(med) <= int(mx) < 10**9, ln


def test_tail_l2_env_is_checked_and_the_cpu_keeps_its_ffma_tiles(monkeypatch):
    """CARE_EXT_TAIL_L2 takes ffma, mma, auto or nothing; anything else is an error naming it. The
    CPU twin has no tensor cores: whatever the value, it runs the FFMA tiles (same bits)."""
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(3, 8, 16, torch.bfloat16, torch.Generator())
    block = lambda: run_step(  # noqa: E731
        "_acquisition_step_fused_block", "cpu", ids, lengths, h_p, h_r, s1, s2, [], 8, 1)
    monkeypatch.setenv("CARE_EXT_TAIL_L2", "tf32")
    with pytest.raises(RuntimeError,
                       match="CARE_EXT_TAIL_L2 must be ffma, mma or auto, got 'tf32'"):
        block()
    monkeypatch.setenv("CARE_EXT_TAIL_L2", "ffma")
    ffma = block()
    for value in ("mma", "auto", ""):
        monkeypatch.setenv("CARE_EXT_TAIL_L2", value)
        for k, (a, b) in enumerate(zip(block(), ffma)):
            assert torch.equal(a, b), (value, k)


@pytest.mark.cuda
@pytest.mark.parametrize("G, tensor_cores", [(8, False), (15, False), (16, True), (64, True)])
def test_cuda_tail_l2_auto_picks_by_group_size(G, tensor_cores, monkeypatch):
    """CARE_EXT_TAIL_L2=auto (the default: unset or empty is auto) runs rollout layer 2 on tensor
    cores from G = 16 rollouts on (the outputs are mma's bits) and the FFMA tiles below (ffma's
    bits); either way like the reference."""
    inputs, runs = _cuda_fused_step_under("CARE_EXT_TAIL_L2", ("ffma", "mma", "auto", ""), 20, G,
                                          {}, True, G, monkeypatch)
    for layout, (ffma, mma, auto, default) in runs:
        for k, (a, b) in enumerate(zip(default, auto)):
            assert torch.equal(a, b), (layout, "default", k)
        assert not all(torch.equal(a, b) for a, b in zip(mma, ffma)), layout  # the modes differ
        picked = mma if tensor_cores else ffma
        for k, (a, b) in enumerate(zip(auto, picked)):
            assert torch.equal(a, b), (layout, k)
        assert_step_like_reference(auto, *inputs)


@pytest.mark.cuda
@pytest.mark.parametrize("staged", ["0", "1"], ids=["r2w-in-place", "r2w-staged"])
@pytest.mark.parametrize("split", [False, True], ids=["fp32", "split"])
@pytest.mark.parametrize("B, G, dims", [(6, 1, {}), (5, 3, {}), (300, 8, {}), (600, 64, {}),
                                        (40, 16, {"R2": 19, "K": 11}), (40, 16, ODD)])
def test_cuda_tail_with_layer2_on_tensor_cores_is_like_the_reference(B, G, dims, split, staged,
                                                                     monkeypatch):
    """CARE_EXT_TAIL_L2=mma: rollout layer 2 on tensor cores, three TF32 products per float32 one
    (layer2_pool_parts_mma). Every output is within the float32 path's own error of the float64
    reference, for 1 to 64 rollouts (16-row tiles, partly empty), masked pools (Stage-II's
    minority), R2 off the 64-unit warp tiles, row-major and column-major weights, the weight read
    in place or staged in shared memory, and both first-layer paths; with R1 = 7 (not a multiple of
    8) the kernel keeps the FFMA tiles, so the outputs equal the default's bit for bit."""
    monkeypatch.setenv("CARE_EXT_TAIL_STAGE_R2", staged)
    inputs, runs = _cuda_fused_step_under("CARE_EXT_TAIL_L2", ("ffma", "mma"), B, G, dims, split,
                                          B * 7 + G, monkeypatch)
    for layout, (ffma, mma) in runs:
        assert_step_like_reference(mma, *inputs)
        same = [torch.equal(a, b) for a, b in zip(mma, ffma)]
        if dims.get("R1", 64) % 8:
            assert all(same), (layout, same)
        else:  # the tensor cores ran: another summation order, so some pool bits differ
            assert not all(same), (layout, "tensor-core path gave the FFMA bits")


def _mma_same_bits_under(var, values, B, G, dims, seed, monkeypatch):
    """The split-bf16 fused CUDA step with tensor-core layer 2 (CARE_EXT_TAIL_L2=mma) under each
    of ``values`` of ``var`` and under ``var`` empty (its default): every output equal bit for bit
    across all three, and like the float64 reference. Returns the CPU inputs."""
    monkeypatch.setenv("CARE_EXT_TAIL_L2", "mma")
    inputs, runs = _cuda_fused_step_under(var, (*values, ""), B, G, dims, True, seed, monkeypatch)
    for layout, (first, *others) in runs:
        for value, outs in zip((*values[1:], "(default)"), others):
            for k, (a, b) in enumerate(zip(outs, first)):
                assert torch.equal(a, b), (layout, var, value, k)
        assert_step_like_reference(first, *inputs)
    return inputs


@pytest.mark.cuda
@pytest.mark.parametrize("staged", ["0", "1"], ids=["r2w-in-place", "r2w-staged"])
@pytest.mark.parametrize("B, G, dims", [(6, 1, {}), (300, 8, {}), (600, 64, {}), (40, 33, {}),
                                        (40, 16, {"R2": 19, "K": 11}), (40, 16, ODD)])
def test_cuda_tail_mma_with_presplit_operands_gives_the_same_bits(B, G, dims, staged,
                                                                  monkeypatch):
    """CARE_EXT_TAIL_MMA_PRESPLIT=1 (the default): the tensor-core layer 2 reads its weight split
    once per call by a kernel of its own (fragment order) and its inputs split by layer 1, where
    =0 splits both inside its loop. The same pieces in the same products and order: every output
    equals the in-loop split's bit for bit, for 1 to 64 rollouts (partial 16-row tiles), 1 to 4
    prompts per block (B picks them; 65 KB of shared memory per block at G = 64 with 4), R2 off the
    32-unit warp passes, and with the weight staged or not; with R1 = 7 layer 2 keeps its FFMA
    tiles and nothing is split. The split kernel runs exactly when the tensor cores do."""
    monkeypatch.setenv("CARE_EXT_TAIL_STAGE_R2", staged)
    inputs = _mma_same_bits_under("CARE_EXT_TAIL_MMA_PRESPLIT", ("0", "1"), B, G, dims, B * 3 + G,
                                  monkeypatch)

    from torch.profiler import ProfilerActivity, profile

    from care_ext.bf16_split import first_layer_split

    ids, lengths, h_p, h_r, s1, s2 = inputs
    w1, w2 = [t.cuda() for t in s1], [t.cuda() for t in s2]
    pieces = first_layer_split(s1, s2, 64)
    for value, l2, want in (("1", "mma", dims.get("R1", 64) % 8 == 0), ("0", "mma", False),
                            ("1", "ffma", False)):
        monkeypatch.setenv("CARE_EXT_TAIL_MMA_PRESPLIT", value)
        monkeypatch.setenv("CARE_EXT_TAIL_L2", l2)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run_step("_acquisition_step_fused_split", "cuda", ids, lengths, h_p, h_r, w1, w2,
                     pieces)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
        assert any("step_tail_kernel" in n for n in names), names  # the profiler saw the tail
        assert any("split_r2w_frag" in n for n in names) == want, (value, l2, names)


@pytest.mark.cuda
@pytest.mark.parametrize("B, G, dims", [(6, 1, {}), (40, 33, {}), (600, 64, {}),
                                        (40, 16, {"R2": 19, "K": 11}), (300, 8, {})])
def test_cuda_tail_mma_tall_tiles_give_the_same_bits(B, G, dims, monkeypatch):
    """CARE_EXT_TAIL_MMA_TILES=4x2: the pre-split tensor-core layer 2 holds 4 row tiles x 2 unit
    tiles per warp instead of 2 x 4 (each weight fragment loaded once for 4 row tiles). Every
    accumulator takes the same products in the same order and the pool adds the row tiles in the
    same order: every output equals the 2x4 tiles' bit for bit, for partial tile groups (G = 1,
    33: 3 row tiles), 1 to 4 prompts per block and R2 off the 16-unit warp passes."""
    _mma_same_bits_under("CARE_EXT_TAIL_MMA_TILES", ("2x4", "4x2"), B, G, dims, B * 5 + G,
                         monkeypatch)


@pytest.mark.parametrize("var, values, bad", [("CARE_EXT_TAIL_MMA_TILES", ("2x4", "4x2"), "4x4"),
                                           ("CARE_EXT_TAIL_MMA_PRESPLIT", ("0", "1"), "on")])
def test_tail_mma_envs_are_checked(var, values, bad, monkeypatch):
    """CARE_EXT_TAIL_MMA_TILES (2x4, 4x2) and CARE_EXT_TAIL_MMA_PRESPLIT (0, 1) take their two
    values or nothing; anything else is an error naming the variable (the CPU twin checks them too,
    and runs its FFMA tiles whatever they say: the same bits)."""
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(3, 8, 16, torch.bfloat16, torch.Generator())
    block = lambda: run_step(  # noqa: E731
        "_acquisition_step_fused_block", "cpu", ids, lengths, h_p, h_r, s1, s2, [], 8, 1)
    monkeypatch.setenv(var, bad)
    with pytest.raises(RuntimeError,
                       match=f"{var} must be {values[0]} or {values[1]}, got '{bad}'"):
        block()
    monkeypatch.setenv(var, values[0])
    first = block()
    monkeypatch.setenv(var, values[1])
    for k, (x, y) in enumerate(zip(block(), first)):
        assert torch.equal(x, y), k


@pytest.mark.cuda
@pytest.mark.parametrize("split", [False, True], ids=["fp32", "split"])
@pytest.mark.parametrize("B, G, dims", [(5, 3, {}), (300, 8, {}), (600, 64, {}), (40, 16, ODD)])
def test_cuda_step_overlap_gives_the_same_bits(B, G, dims, split, monkeypatch):
    """CARE_EXT_STEP_OVERLAP=1 runs group_features and the prompt branches' first-layer GEMM(s)
    on a second stream beside the rollout GEMM(s); =0 runs all on one stream, in order; auto (the
    default) overlaps only in graph capture (eager: one stream). The same ops on the same values:
    every output equals the in-order run's bit for bit, for both weight layouts, and is like the
    float64 reference."""
    _assert_same_bits_under("CARE_EXT_STEP_OVERLAP", ("0", "1", "auto", ""), B, G, dims, split,
                            B * 7 + G, monkeypatch)


@pytest.mark.cuda
@pytest.mark.parametrize("head", ["tail", "split"])
@pytest.mark.parametrize("split", [False, True], ids=["fp32", "split"])
def test_cuda_step_overlap_on_a_side_stream_and_in_a_graph(split, head, monkeypatch):
    """The overlapped step called from a non-default stream, and captured into a CUDA graph (auto
    overlaps while capturing: the fork and join become graph edges) then replayed on new inputs
    written into the captured ones: every output equals the in-order eager step's on the same
    inputs, bit for bit; also with the head in a kernel of its own (CARE_EXT_TAIL_HEAD=split,
    whose counters the tail zeroes on every replay)."""
    from care_ext.bf16_split import first_layer_split

    monkeypatch.setenv("CARE_EXT_TAIL_HEAD", head)

    gen = torch.Generator().manual_seed(11)
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(64, 8, 64, torch.bfloat16, gen)
    w1, w2 = [t.cuda() for t in s1], [t.cuda() for t in s2]
    pieces = [t.cuda() for t in first_layer_split(s1, s2, 64)] if split else None
    op = getattr(torch.ops.care_ext,
                 "_acquisition_step_fused_split" if split else "_acquisition_step_fused")
    static = [t.cuda() for t in (ids, lengths, h_p, h_r)]
    call = lambda: op(*static, w1, w2, 4000.0, 0.0, False, 1e-6, False,  # noqa: E731
                      *([pieces] if split else []))
    monkeypatch.setenv("CARE_EXT_STEP_OVERLAP", "0")
    want = [t.clone() for t in call()]
    monkeypatch.setenv("CARE_EXT_STEP_OVERLAP", "1")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = call()
    torch.cuda.current_stream().wait_stream(s)
    for k, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), ("side stream", k)
    monkeypatch.setenv("CARE_EXT_STEP_OVERLAP", "auto")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = call()
    ids2, lengths2, h_p2, h_r2, _, _ = step_inputs(64, 8, 64, torch.bfloat16, gen)
    for dst, src in zip(static, (ids2, lengths2, h_p2, h_r2)):
        dst.copy_(src)
    g.replay()
    monkeypatch.setenv("CARE_EXT_STEP_OVERLAP", "0")
    want = call()
    for k, (a, b) in enumerate(zip(captured, want)):
        assert torch.equal(a, b), ("graph", k)


def test_step_overlap_env_is_checked(monkeypatch):
    """CARE_EXT_STEP_OVERLAP takes 0, 1, auto or nothing; anything else is an error naming the
    variable (the CPU twins check it too, and run their host part in order whatever it says)."""
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(3, 8, 16, torch.bfloat16, torch.Generator())
    calls = [lambda op=op, more=more: run_step(op, "cpu", ids, lengths, h_p, h_r, s1, s2, [],
                                               *more)
             for op, more in (("_acquisition_step_fused_block", (8, 1)),
                              ("_acquisition_step_fused_split", ()))]
    monkeypatch.setenv("CARE_EXT_STEP_OVERLAP", "yes")
    for call in calls:
        with pytest.raises(RuntimeError,
                           match="CARE_EXT_STEP_OVERLAP must be 0, 1 or auto, got 'yes'"):
            call()
    monkeypatch.setenv("CARE_EXT_STEP_OVERLAP", "0")
    first = [call() for call in calls]
    for value in ("1", "auto", ""):
        monkeypatch.setenv("CARE_EXT_STEP_OVERLAP", value)
        for call, want in zip(calls, first):
            for k, (x, y) in enumerate(zip(call(), want)):
                assert torch.equal(x, y), (value, k)


def test_fused_step_block_checks_its_threads():
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(2, 4, 16, torch.float32, torch.Generator())
    block = lambda threads, prompts: run_step(  # noqa: E731
        "_acquisition_step_fused_block", "cpu", ids, lengths, h_p, h_r, s1, s2, [], threads, prompts)
    with pytest.raises(RuntimeError, match=r"threads must be in \[1, 1024\].*got 0"):
        block(0, 1)
    with pytest.raises(RuntimeError, match=r"prompts must be in \[1, 4\], got 5"):
        block(8, 5)


@pytest.mark.parametrize("op", STEP_OPS + ["_acquisition_step_fused_split"])
@pytest.mark.parametrize("G", [3, 16])
def test_step_with_odd_layer_sizes(device, G, op):
    """Layer sizes that are not multiples of the tail's tiles and load chunks (P = 13, R1 = 7,
    R2 = 19, K = 11 against tiles of 4 units, 4 steps and 16-step dot products): the remainder
    loops give the reference's results too."""
    from care_ext.bf16_split import first_layer_split

    H = 40
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(9, G, H, torch.bfloat16,
                                                 torch.Generator().manual_seed(G),
                                                 P=13, R1=7, R2=19, K=11)
    split = first_layer_split(s1, s2, H) if op.endswith("_split") else None
    got = run_step(op, device, ids, lengths, h_p, h_r, s1, s2, split)
    assert_step_like_reference(got, ids, lengths, h_p, h_r, s1, s2)


def test_fused_step_layout_checks_its_input():
    import care_ext.ops as ops

    w = random_weights(16, 3, 1, 2, torch.Generator().manual_seed(0))
    out = ops.fused_step_layout(w)
    assert all(torch.equal(a, b) for a, b in zip(out, w))
    assert all(out[i] is w[i] for i in range(1, 10, 2))  # biases untouched
    with pytest.raises(ValueError, match="10 folded weights, got 9"):
        ops.fused_step_layout(w[:9])
    with pytest.raises(ValueError, match=r"weights\[4\] \(resp2_w\) must be 2-D"):
        ops.fused_step_layout(w[:4] + [w[4].flatten()] + w[5:])


def test_public_step_routes_to_the_fused_op_on_request(device, monkeypatch):
    """care_ext.ops.acquisition_step (what the core calls) runs the default kernel, or the private
    fused one with CARE_EXT_FUSED_STEP=1 (so a GPU check can run the core both ways)."""
    import care_ext.ops as ops

    gen = torch.Generator().manual_seed(5)
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(40, 8, 96, torch.bfloat16, gen)
    args = (ids.to(device), lengths.to(device), h_p.to(device), h_r.to(device),
            [t.to(device) for t in s1], [t.to(device) for t in s2], 4000.0, 0.0, False, 1e-6, False)
    default = torch.ops.care_ext.acquisition_step(*args)
    fused = torch.ops.care_ext._acquisition_step_fused(*args)
    i = R.AcquisitionOutputs._fields.index("stage1_logits")
    assert not torch.equal(default[i], fused[i])  # two summation orders: the routing is observable
    for env, want in (("0", default), ("1", fused)):
        monkeypatch.setenv("CARE_EXT_FUSED_STEP", env)
        got = ops.acquisition_step(*args)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), env


# ---- the blocked CPU rollout branch (csrc/cpu/rollout_pool.cpp): blocks of ~256 rows of whole
# prompts, run in parallel; Stage-II multiplies only its masked rows ------------------------------
@pytest.mark.parametrize("op", STEP_OPS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B,G", [(300, 8), (9, 64), (70, 5), (257, 1)])
def test_acquisition_step_many_blocks(device, B, G, threads, op):
    """Sizes that span several blocks (and a last partial block) on 1 and 2 intra-op threads."""
    gen = torch.Generator().manual_seed(B + G + threads)
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(B, G, 48, torch.bfloat16, gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = run_step(op, device, ids, lengths, h_p, h_r, s1, s2)
    finally:
        torch.set_num_threads(before)
    ref64 = R.acquisition_step(ids, lengths, h_p, h_r, to64(s1), to64(s2), 4000.0, 0.0, False,
                               1e-6, False)
    ref32 = R.acquisition_step(ids, lengths, h_p, h_r, s1, s2, 4000.0, 0.0, False, 1e-6, False)
    for name in ("stage1_logits", "probs", "ecag"):
        i = R.AcquisitionOutputs._fields.index(name)
        assert_like_torch(got[i], ref32[i], ref64[i].double(), name)


@pytest.mark.parametrize("split", [False, True], ids=["fp32", "split"])
@pytest.mark.parametrize("B, G, threads", [(64, 8, 4), (64, 8, 16), (33, 16, 6), (5, 64, 8)])
def test_cpu_small_blocks_give_every_thread_a_block_and_the_same_results(B, G, threads, split,
                                                                         monkeypatch):
    """CARE_EXT_CPU_SMALL_BLOCKS=1 (the default, unset included; for many-core controllers): with
    more threads than 256-row blocks, ceil(B / threads) prompts per block (at least 32 rows), run
    in parallel with single-threaded GEMMs. Same decisions as CARE_EXT_CPU_SMALL_BLOCKS=0 (two big
    blocks on all threads' GEMMs): integer and bool outputs equal, the classifier outputs within
    float32 error of the reference (not bit for bit: a block's few masked Stage-II rows may take
    another MKL kernel than the same rows among more), with both first-layer paths; a bad value is
    an error naming the knob."""
    from care_ext.bf16_split import first_layer_split

    gen = torch.Generator().manual_seed(B + G + threads)
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(B, G, 256, torch.bfloat16, gen)
    op, extra = "acquisition_step", None
    if split:
        op, extra = "_acquisition_step_split", first_layer_split(s1, s2, 256)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        monkeypatch.setenv("CARE_EXT_CPU_SMALL_BLOCKS", "0")
        big = run_step(op, "cpu", ids, lengths, h_p, h_r, s1, s2, extra)
        monkeypatch.setenv("CARE_EXT_CPU_SMALL_BLOCKS", "1")
        small = run_step(op, "cpu", ids, lengths, h_p, h_r, s1, s2, extra)
        monkeypatch.delenv("CARE_EXT_CPU_SMALL_BLOCKS")
        default = run_step(op, "cpu", ids, lengths, h_p, h_r, s1, s2, extra)
        monkeypatch.setenv("CARE_EXT_CPU_SMALL_BLOCKS", "many")
        with pytest.raises(RuntimeError, match="CARE_EXT_CPU_SMALL_BLOCKS must be 1 or 0"):
            run_step(op, "cpu", ids, lengths, h_p, h_r, s1, s2, extra)
    finally:
        torch.set_num_threads(before)
    for k, (a, b) in enumerate(zip(small, big)):
        if a.dtype in (torch.int64, torch.bool):
            assert torch.equal(a, b), R.AcquisitionOutputs._fields[k]
    for k, (a, b) in enumerate(zip(default, small)):  # unset is small blocks
        assert torch.equal(a, b), R.AcquisitionOutputs._fields[k]
    assert_step_like_reference(small, ids, lengths, h_p, h_r, s1, s2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_classifier_forward_masked_blocks_non_contiguous_mask(device, dtype):
    """A transposed (non-contiguous) mask, float16 hidden states, rows with 0, 1 and all G masked."""
    gen = torch.Generator().manual_seed(21)
    B, G, H = 100, 16, 40
    h_p = torch.randn(B, H, generator=gen).to(dtype)
    h_r = torch.randn(B, G, H, generator=gen).to(dtype)
    pf = torch.rand(B, 3, generator=gen)
    rf = torch.rand(B, G, 2, generator=gen)
    mask = (torch.rand(G, B, generator=gen) < 0.4).T
    mask[0] = False
    mask[1] = True
    mask[2] = False
    mask[2, 5] = True
    assert not mask.is_contiguous()
    w = random_weights(H, 3, 2, 4, gen)
    got = torch.ops.care_ext.classifier_forward(h_p.to(device), pf.to(device), h_r.to(device),
                                                rf.to(device), mask.to(device),
                                                [t.to(device) for t in w])
    assert_like_torch(got, R.classifier_forward(h_p, pf, h_r, rf, mask, w),
                       R.classifier_forward(h_p, pf, h_r, rf, mask, to64(w)), "masked blocks")


def test_cpu_masked_rows_are_never_read():
    """CPU: Stage-II multiplies only its masked rows, so a NaN hidden state outside the mask does not
    reach the pool (the dense path and the reference multiply such rows by zero: NaN * 0 = NaN)."""
    gen = torch.Generator().manual_seed(5)
    B, G, H = 40, 8, 32
    h_p, h_r, pf = torch.randn(B, H, generator=gen), torch.randn(B, G, H, generator=gen), torch.rand(B, 1)
    mask = torch.rand(B, G, generator=gen) < 0.5
    w = random_weights(H, 1, 0, 3, gen)
    clean = torch.ops.care_ext.classifier_forward(h_p, pf, h_r, None, mask, w)
    poisoned = h_r.clone()
    poisoned[~mask] = float("nan")
    got = torch.ops.care_ext.classifier_forward(h_p, pf, poisoned, None, mask, w)
    assert torch.equal(got, clean)
    assert R.classifier_forward(h_p, pf, poisoned, None, mask, w).isnan().any()


@pytest.mark.parametrize("where", ["rollout", "prompt"])
def test_nan_in_a_pooled_row_reaches_the_logits_as_in_torch(device, where):
    """relu keeps NaN (torch.relu(nan) is nan): a NaN hidden state in a row the classifier pools
    (or in a prompt's state) makes exactly that prompt's logits NaN, in the native kernels' fused
    relu passes (CPU: feature columns + relu, bias + relu + pool, head) as in the reference."""
    gen = torch.Generator().manual_seed(11)
    B, G, H = 6, 4, 32
    h_p, h_r = torch.randn(B, H, generator=gen), torch.randn(B, G, H, generator=gen)
    pf, rf = torch.rand(B, 3, generator=gen), torch.rand(B, G, 1, generator=gen)
    w = random_weights(H, 3, 1, 2, gen)
    if where == "rollout":
        h_r[2, 1, 5] = float("nan")
    else:
        h_p[2, 5] = float("nan")
    got = torch.ops.care_ext.classifier_forward(h_p.to(device), pf.to(device), h_r.to(device),
                                                rf.to(device), None, [t.to(device) for t in w]).cpu()
    ref = R.classifier_forward(h_p, pf, h_r, rf, None, w)
    assert torch.equal(ref.isnan().any(1), torch.arange(B) == 2)
    assert torch.equal(got.isnan(), ref.isnan())


def test_weights_that_require_grad_give_the_same_outputs(device):
    """A training loop's live parameters (requires_grad) go in as they are: the kernels run their
    inner ops below the autograd keys, and the outputs equal those of detached weights bit for
    bit (classifier_forward and the acquisition step)."""
    gen = torch.Generator().manual_seed(12)
    B, G, H = 5, 4, 32
    h_p, h_r = torch.randn(B, H, generator=gen), torch.randn(B, G, H, generator=gen)
    pf, rf = torch.rand(B, 3, generator=gen), torch.rand(B, G, 1, generator=gen)
    w = [t.to(device) for t in random_weights(H, 3, 1, 2, gen)]
    live = [t.clone().requires_grad_() for t in w]
    args = (h_p.to(device), pf.to(device), h_r.to(device), rf.to(device), None)
    assert torch.equal(torch.ops.care_ext.classifier_forward(*args, live).detach(),
                       torch.ops.care_ext.classifier_forward(*args, w))
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(B, G, H, torch.float32, gen)
    ids, lengths, h_p, h_r = (t.to(device) for t in (ids, lengths, h_p, h_r))
    s1, s2 = [t.to(device) for t in s1], [t.to(device) for t in s2]
    rest = (4000.0, 0.0, False, 1e-6, False)
    plain = torch.ops.care_ext.acquisition_step(ids, lengths, h_p, h_r, s1, s2, *rest)
    grads = torch.ops.care_ext.acquisition_step(
        ids, lengths, h_p, h_r, [t.clone().requires_grad_() for t in s1],
        [t.clone().requires_grad_() for t in s2], *rest)
    for a, b in zip(plain, grads):
        assert torch.equal(a, b.detach())


def test_fused_step_tail_sees_every_input():
    """The fused tail must use each input it is given: perturbing one rollout's hidden state, a
    minority rollout, a length or one weight of each kind changes the outputs it feeds."""
    gen = torch.Generator().manual_seed(3)
    B, G, H = 4, 8, 32
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(B, G, H, torch.float32, gen)
    ids[0] = torch.tensor([1, 1, 1, 1, 2, 2, 3, -1])  # prompt 0: minority rollouts 4, 5, 6
    run = lambda **kw: torch.ops.care_ext._acquisition_step_fused(  # noqa: E731
        kw.get("ids", ids), kw.get("lengths", lengths), h_p, kw.get("h_r", h_r),
        kw.get("s1", s1), kw.get("s2", s2), 4000.0, 0.0, False, 1e-6, False)
    base = run()
    h2 = h_r.clone()
    h2[0, 5] += 1.0  # a minority rollout: both stages' logits move
    out = run(h_r=h2)
    assert not torch.equal(out[3][0], base[3][0]) and not torch.equal(out[4][0], base[4][0])
    assert torch.equal(out[3][1:], base[3][1:])
    h3 = h_r.clone()
    h3[0, 0] += 1.0  # a majority rollout: Stage-I moves, Stage-II (minority pool) does not
    out = run(h_r=h3)
    assert not torch.equal(out[3][0], base[3][0]) and torch.equal(out[4][0], base[4][0])
    l2 = lengths.clone()
    l2[0, 0] += 500  # Stage-I's rollout feature
    assert not torch.equal(run(lengths=l2)[3][0], base[3][0])
    for k in range(10):
        for stage, idx in (("s1", 3), ("s2", 4)):
            w = [t.clone() for t in (s1 if stage == "s1" else s2)]
            w[k].mul_(1 + torch.rand(w[k].shape, generator=gen))
            out = run(**{stage: w})
            assert not torch.equal(out[idx], base[idx]), f"{stage} weight {k} unused"


@pytest.mark.parametrize("op", STEP_OPS + ["_acquisition_step_fused_split", "classifier_forward"])
def test_ops_ignore_an_enclosing_autocast(device, op):
    """Inside ``torch.autocast`` (a caller's mixed-precision region) the ops keep their float32
    semantics: the same bits as outside it. Without the autocast keys excluded in the kernels,
    their inner GEMMs re-dispatched through autocast and came back in bf16 (a dtype error)."""
    from care_ext.bf16_split import first_layer_split

    gen = torch.Generator().manual_seed(5)
    B, G, H = 9, 8, 48
    ids, lengths, h_p, h_r, s1, s2 = step_inputs(B, G, H, torch.bfloat16, gen)
    if op == "classifier_forward":
        pf = torch.rand(B, G + 1, generator=gen)
        mask = torch.rand(B, G, generator=gen) > 0.5
        args = [t.to(device) for t in (h_p, pf, h_r)] + [None, mask.to(device),
                                                          [w.to(device) for w in s2]]

        def call():
            return (torch.ops.care_ext.classifier_forward(*args),)
    else:
        split = first_layer_split(s1, s2, H) if op.endswith("_split") else None

        def call():
            return run_step(op, device, ids, lengths, h_p, h_r, s1, s2, split)
    plain = call()
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        mixed = call()
    assert len(mixed) == len(plain)
    for m, p in zip(mixed, plain):
        assert m.dtype == p.dtype and torch.equal(m, p)
