"""The CARE core with its classifiers on the GPU (CareConfig.device="cuda"); skipped without one.

A CPU-run controller and a CUDA-run one see the same batches; the CUDA one must run decide and
update without device errors (a class-weight tensor on the CPU broke update on the H200,
2026-11-26) and make decisions of the same kind.
"""
import pytest
import torch
from core_synth import make_batch, make_world

from care_ext import ops
from care_ext.config import CareConfig
from care_ext.decision import DROPPED
from care_ext.labels import GoldOracle
from care_ext.step import CareController


@pytest.mark.cuda
def test_care_on_cuda_runs_decide_and_update():
    world = make_world(B=32, G=8, H=16, seed=1)
    batches = [make_batch(world, s, seed=1) for s in range(4)]
    gold = {u: g for b in batches for u, g in b.gold.items()}
    ctl = CareController(CareConfig(strategy="care", group_size=8, device="cuda", warmup_steps=1),
                         GoldOracle(gold))
    for s, b in enumerate(batches):  # lengths on the CPU at even steps, on the GPU at odd ones
        kw = {k: v.cuda() if k != "lengths" or s % 2 else v for k, v in b.kwargs().items()}
        d = ctl.decide(b.uids, b.ids, **kw)
        assert d.labels_bought == 7  # ceil(0.2 * 32)
        assert torch.isfinite(d.weight).all()
        losses = ctl.update()
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


@pytest.mark.cuda
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_every_input_on_the_gpu_with_a_dropped_nan_row(device):
    """The host hands ids, lengths and hidden states on the GPU, one row NaN under
    nonfinite='drop': decide keeps its masks with the tensors they meet (the CPU ``bad`` mask
    met GPU lengths in torch.where, and GPU finiteness rows in ``bad |= ~fin``), with the
    classifiers on either device."""
    world = make_world(B=32, G=8, H=16, seed=1)
    b = make_batch(world, 0, seed=1)
    kw = {k: v.cuda() for k, v in b.kwargs().items()}
    kw["h_resp"][3, 0, 0] = float("nan")
    cfg = CareConfig(strategy="care", group_size=8, device=device, warmup_steps=1,
                     nonfinite="drop")
    ctl = CareController(cfg, GoldOracle(b.gold))
    d = ctl.decide(b.uids, b.ids.cuda(), **kw)
    assert int(d.source[3]) == DROPPED and d.labels_bought == 7
    ctl.update()


@pytest.mark.cuda
def test_prob_strategy_with_log_probs_on_the_gpu():
    """Prob ranks on the mean token probability: GPU log-probs must not leak a GPU score into
    the CPU selection."""
    b = make_batch(make_world(B=32, G=8, H=16, seed=1), 0, seed=1)
    ctl = CareController(CareConfig(strategy="prob", group_size=8), GoldOracle(b.gold))
    lp = -torch.rand(32, 8, generator=torch.Generator().manual_seed(0))
    d = ctl.decide(b.uids, b.ids, logprobs=lp.cuda())
    assert d.labels_bought == 7


def test_class_weights_follow_the_label_device():
    from care_ext.classifiers import class_weights
    labels = torch.tensor([0, 0, 1, 3])
    w = class_weights(labels, 5, 0.5, (0.25, 4.0))
    assert w.device == labels.device and w[2] == 0 and w[4] == 0 and w[0] < w[1]


def _run_two(configs, steps=4, device="cuda"):
    """Decisions and trust weights of controllers with the given configs on the same batches;
    ``ctl.split_used`` counts the decide calls after which the trainer held split pieces (built
    for that decide; update() drops them with the old weights)."""
    world = make_world(B=32, G=8, H=64, seed=2)
    batches = [make_batch(world, s, seed=2) for s in range(steps)]
    gold = {u: g for b in batches for u, g in b.gold.items()}
    ctls = [CareController(CareConfig(strategy="care", group_size=8, device=device, warmup_steps=1,
                                      **c), GoldOracle(gold)) for c in configs]
    out = [[] for _ in ctls]
    for b in batches:
        kw = b.kwargs()
        kw["h_prompt"], kw["h_resp"] = kw["h_prompt"].bfloat16(), kw["h_resp"].bfloat16()
        if device == "cuda":
            kw = {k: v.cuda() if k != "lengths" else v for k, v in kw.items()}
        for i, c in enumerate(ctls):
            out[i].append(c.decide(b.uids, b.ids, **kw))
            c.split_used = getattr(c, "split_used", 0) + bool(c.trainer._split)
            c.update()
    return ctls, out


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=pytest.mark.cuda), "cpu"])
def test_split_bf16_first_layers_decide_like_float32(device):
    """first_layer_gemm='bf16x3' (bf16 GEMMs on split weights: tensor cores on CUDA, MKL's bf16
    GEMM on the CPU) decides like 'float32'."""
    ctls, (ref, split) = _run_two([{}, {"first_layer_gemm": "bf16x3"}], device=device)
    # the split path ran at every step, the float32 one never built pieces (checked after each
    # decide: update() empties the cache, which made an end-of-run check fail on any device)
    assert ctls[1].split_used == len(split) and ctls[0].split_used == 0
    for a, b in zip(ref, split):
        assert torch.equal(a.source, b.source)
        torch.testing.assert_close(b.weight, a.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.reliability, a.reliability, rtol=1e-4, atol=1e-5)


def test_first_layer_gemm_accepts_only_the_documented_values():
    with pytest.raises(ValueError, match="first_layer_gemm"):
        CareConfig(first_layer_gemm="tf32")
    with pytest.raises(ValueError, match="first_layer_pack"):
        CareConfig(first_layer_pack=True)


@pytest.mark.parametrize("mode,background,packs", [("auto", False, False), ("auto", True, True),
                                                    ("on", False, True), ("off", True, False)])
def test_first_layer_pack_modes(mode, background, packs):
    """'auto' packs exactly when the update runs in the background (its thread packs)."""
    from care_ext.trainer import ClassifierTrainer

    cfg = CareConfig(strategy="care", group_size=8, first_layer_pack=mode,
                     background_update=background)
    assert ClassifierTrainer(cfg, 32).packs is packs


def test_trainer_split_cache_follows_the_weights():
    from care_ext.bf16_split import first_layer_split
    world = make_world(B=32, G=8, H=64, seed=2)
    batches = [make_batch(world, s, seed=2) for s in range(3)]
    gold = {u: g for b in batches for u, g in b.gold.items()}
    ctl = CareController(CareConfig(strategy="care", group_size=8, warmup_steps=1), GoldOracle(gold))
    ctl.decide(batches[0].uids, batches[0].ids, **batches[0].kwargs())
    ctl.update()
    tr = ctl.trainer
    s3 = tr.first_layer_split(3)
    assert tr.first_layer_split(3) is s3
    w1, w2 = tr.folded()
    for got, want in zip(s3, first_layer_split(w1, w2, tr.hidden_size, 3)):
        assert torch.equal(got, want)
    before = [p.clone() for p in s3]
    for b in batches[1:]:
        ctl.decide(b.uids, b.ids, **b.kwargs())
        ctl.update()
    now = tr.first_layer_split(3)  # an update invalidates the pieces with the weights ...
    assert now is not s3 and not torch.equal(now[0], before[0])
    w1, w2 = tr.folded()
    for got, want in zip(now, first_layer_split(w1, w2, tr.hidden_size, 3)):
        assert torch.equal(got, want)
    # ... and the new pieces are written into the old ones' buffers (no fresh pages per update)
    assert [p.data_ptr() for p in now] == [p.data_ptr() for p in s3]


def _folded_after_one_update(device, H=64, with_batch=False, **config):
    world = make_world(B=32, G=8, H=H, seed=3)
    b = make_batch(world, 0, seed=3)
    ctl = CareController(CareConfig(strategy="care", group_size=8, warmup_steps=1, device=device,
                                    **config), GoldOracle(dict(b.gold)))
    kw = b.kwargs() if device == "cpu" else {k: v.cuda() if k != "lengths" else v
                                              for k, v in b.kwargs().items()}
    ctl.decide(b.uids, b.ids, **kw)
    ctl.update()
    return (ctl.trainer.folded(), ctl.trainer) + ((b,) if with_batch else ())


def test_folded_weights_are_row_major_on_the_cpu():
    """Off CUDA, below SHARED_LAYOUT_MIN_HIDDEN (the CPU lab's H = 128), the core passes fold()'s
    contiguous weights: the lab's float32 summation order is kept."""
    (w1, w2), tr = _folded_after_one_update("cpu")
    for got, want in zip(w1 + w2, tr.stage1.fold() + tr.stage2.fold()):
        assert got.is_contiguous() and torch.equal(got, want)


def test_folded_first_layers_share_a_buffer_on_the_cpu_at_llm_widths(monkeypatch):
    """On the CPU at H >= SHARED_LAYOUT_MIN_HIDDEN with float32 first layers on MKL
    (CARE_EXT_CPU_GEMM=mkl) the core stores both stages' first layers side by side (one GEMM for
    both in the CPU step), same values, and the step gives what the row-major weights give."""
    from care_ext.ops import SHARED_LAYOUT_MIN_HIDDEN

    monkeypatch.setenv("CARE_EXT_CPU_GEMM", "mkl")
    H = SHARED_LAYOUT_MIN_HIDDEN
    (w1, w2), tr, b = _folded_after_one_update("cpu", H=H, with_batch=True,
                                               first_layer_gemm="float32")
    row1, row2 = tr.stage1.fold(), tr.stage2.fold()
    for got, want in zip(w1 + w2, row1 + row2):
        assert torch.equal(got, want)
    for i in (0, 2):  # prompt_w, resp1_w: views of one buffer per layer
        assert w1[i].untyped_storage().data_ptr() == w2[i].untyped_storage().data_ptr()
        assert not w1[i].is_contiguous()
    hp, hr = b.h_prompt.bfloat16(), b.h_resp.bfloat16()
    shared = ops.acquisition_step(b.ids, b.lengths, hp, hr, w1, w2)
    row = ops.acquisition_step(b.ids, b.lengths, hp, hr, row1, row2)
    for name in ("reliability", "stage1_logits", "probs", "ecag"):
        torch.testing.assert_close(getattr(shared, name), getattr(row, name), rtol=1e-5,
                                   atol=1e-6, msg=name)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="the AVX2 GEMM needs an x86 CPU with AVX2 and FMA")
def test_folded_weights_stay_row_major_where_the_cpu_step_packs_them(monkeypatch):
    """With the CPU step on the AVX2 GEMM (CARE_EXT_CPU_GEMM=avx2; auto on x86 without AVX-512F),
    which packs the weights from any layout, the side-by-side copy is skipped: fold()'s weights."""
    from care_ext.ops import SHARED_LAYOUT_MIN_HIDDEN

    monkeypatch.setenv("CARE_EXT_CPU_GEMM", "avx2")
    (w1, w2), tr = _folded_after_one_update("cpu", H=SHARED_LAYOUT_MIN_HIDDEN,
                                            first_layer_gemm="float32")
    for got, want in zip(w1 + w2, tr.stage1.fold() + tr.stage2.fold()):
        assert got.is_contiguous() and torch.equal(got, want)


def test_folded_weights_stay_row_major_for_the_cpu_split_step():
    """With split first layers on the CPU the side-by-side copy is skipped (the split step reads
    only the feature columns of the first layers): fold()'s weights, and pieces split from them."""
    from care_ext.bf16_split import first_layer_split
    from care_ext.ops import SHARED_LAYOUT_MIN_HIDDEN

    (w1, w2), tr = _folded_after_one_update("cpu", H=SHARED_LAYOUT_MIN_HIDDEN,
                                            first_layer_gemm="bf16x3")
    for got, want in zip(w1 + w2, tr.stage1.fold() + tr.stage2.fold()):
        assert got.is_contiguous() and torch.equal(got, want)
    for got, want in zip(tr.first_layer_split(3), first_layer_split(w1, w2, tr.hidden_size, 3)):
        assert torch.equal(got, want)


def _pack_off_and_on(first_layer_gemm, seed):
    """3 batches of one world, and two controllers that differ only in first_layer_pack
    ('off', 'on')."""
    world = make_world(B=24, G=8, H=64, seed=seed)
    batches = [make_batch(world, s, seed=seed) for s in range(3)]
    gold = {u: g for b in batches for u, g in b.gold.items()}
    return batches, [CareController(CareConfig(strategy="care", group_size=8, warmup_steps=1,
                                               first_layer_gemm=first_layer_gemm,
                                               first_layer_pack=pack), GoldOracle(dict(gold)))
                     for pack in ("off", "on")]


def test_trainer_packs_the_split_pieces_when_asked():
    """CareConfig.first_layer_pack='on' on a CPU with AMX: the step's split is the 2 pieces and
    their packing, equal to a fresh packing, re-packed into the same buffers after an update, and
    the decide's outputs match the unpacked decide's; 'off' or without AMX: the 2 pieces."""
    from care_ext.bf16_split import (cpu_brgemm_available, first_layer_split,
                                     pack_first_layer_split)

    batches, ctls = _pack_off_and_on("bf16x3", seed=4)
    for ctl in ctls:
        b = batches[0]
        ctl.decide(b.uids, b.ids, **{k: v.bfloat16() if k.startswith("h_") else v
                                     for k, v in b.kwargs().items()})
        ctl.update()
    plain, packed = (c.trainer.step_split(3) for c in ctls)
    assert len(plain) == 2 and len(packed) == (4 if cpu_brgemm_available() else 2)
    tr = ctls[1].trainer
    w1, w2 = tr.folded()
    fresh = first_layer_split(w1, w2, tr.hidden_size, 3)
    want = fresh + (pack_first_layer_split(fresh) or [])
    for got, w in zip(packed, want, strict=True):
        assert torch.equal(got.view(torch.int16), w.view(torch.int16))
    assert all(a is b for a, b in zip(tr.step_split(3), packed, strict=True))  # cached
    ptrs = [p.data_ptr() for p in packed]
    b = batches[1]
    kw = {k: v.bfloat16() if k.startswith("h_") else v for k, v in b.kwargs().items()}
    outs = []
    for ctl in ctls:
        outs.append(ctl.decide(b.uids, b.ids, **kw))
        ctl.update()
    again = tr.step_split(3)
    assert [p.data_ptr() for p in again] == ptrs  # re-split and re-packed in place
    w1, w2 = tr.folded()
    fresh = first_layer_split(w1, w2, tr.hidden_size, 3)
    for got, w in zip(again, fresh + (pack_first_layer_split(fresh) or []), strict=True):
        assert torch.equal(got.view(torch.int16), w.view(torch.int16))
    assert torch.equal(outs[0].source, outs[1].source)
    torch.testing.assert_close(outs[0].score, outs[1].score, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.native  # the packing is the native library's
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="the AVX2 GEMM needs an x86 CPU with AVX2 and FMA")
def test_trainer_packs_the_float32_step_weights_when_asked(monkeypatch):
    """float32 first layers on the AVX2 GEMM (CARE_EXT_CPU_GEMM=avx2) with
    CareConfig.first_layer_pack='on': the decide's step takes the folded weights packed once
    (equal to a fresh packing; cached until the next update, then re-packed into the same
    buffer), and decides exactly as 'off' (the same bits: the same panels and sums); with mkl,
    or 'off', nothing is packed."""
    from care_ext.ops import cpu_step_packed_numel, pack_cpu_step_weights

    monkeypatch.setenv("CARE_EXT_CPU_GEMM", "avx2")
    batches, ctls = _pack_off_and_on("float32", seed=5)
    outs = []
    for s, b in enumerate(batches):
        outs.append([ctl.decide(b.uids, b.ids, **b.kwargs()) for ctl in ctls])
        if s == 0:
            tr = ctls[1].trainer
            packed = tr.step_packed_weights()
            assert ctls[0].trainer.step_packed_weights() is None  # 'off'
            assert tr.step_packed_weights() is packed  # cached between updates
            ptr, first = packed.data_ptr(), packed.clone()
        for ctl in ctls:
            ctl.update()
    again = tr.step_packed_weights()
    assert again.data_ptr() == ptr and not torch.equal(again, first)  # re-packed in place
    w1, w2 = tr.folded()
    assert again.numel() == cpu_step_packed_numel(w1, w2, tr.hidden_size)
    assert torch.equal(again, pack_cpu_step_weights(w1, w2, tr.hidden_size))
    for off, on in outs[1:]:  # decided by trained classifiers: the same bits either way
        assert torch.equal(off.source, on.source)
        torch.testing.assert_close(on.score, off.score, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(on.reliability, off.reliability, rtol=0, atol=0)
    monkeypatch.setenv("CARE_EXT_CPU_GEMM", "mkl")
    tr._drop_decide_cache()
    assert tr.step_packed_weights() is None  # the step does not run the AVX2 GEMM there


@pytest.mark.cuda
def test_folded_weights_are_column_major_on_cuda():
    """On CUDA the matrices are stored column-major (the fused tail's coalesced layout), same values."""
    (w1, w2), tr = _folded_after_one_update("cuda")
    for i, (got, want) in enumerate(zip(w1 + w2, tr.stage1.fold() + tr.stage2.fold())):
        assert torch.equal(got, want)
        if got.dim() == 2:
            assert got.t().is_contiguous() and not got.is_contiguous(), i


def test_auto_first_layer_gemm_resolves_by_device_size_and_cpu():
    from care_ext.bf16_split import bf16_flags_in, cpu_bf16_hardware, resolve_first_layer_gemm
    spr = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    epyc = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma bmi2\nbugs\t\t: avx512_bf16\n"
    assert bf16_flags_in(spr) and not bf16_flags_in(epyc) and not bf16_flags_in("")
    assert bf16_flags_in("flags : avx512_bf16\n") and not bf16_flags_in("flags : avx512f\n")
    fixed = {"float32": 0, "bf16x3": 3, "bf16x2": 2}
    for mode, terms in fixed.items():  # fixed modes hold everywhere
        assert resolve_first_layer_gemm(mode, "cuda", 4096) == terms
        assert resolve_first_layer_gemm(mode, "cpu", 64) == terms
    assert resolve_first_layer_gemm("auto", "cuda", 4096) == 0  # CUDA: unmeasured, float32
    assert resolve_first_layer_gemm("auto", "cpu", 1023) == 0  # small H keeps the lab's order
    assert resolve_first_layer_gemm("auto", "cpu", 1024) == (3 if cpu_bf16_hardware() else 0)
    with pytest.raises(ValueError, match="first_layer_gemm"):
        resolve_first_layer_gemm("bf16x4", "cpu", 4096)


def test_default_auto_decides_like_float32_at_llm_width():
    """The default ('auto') at H = 1024 on this CPU: the split step where the CPU has bf16 units
    (else float32), with the decisions and weights of an explicit 'float32' controller."""
    from care_ext.bf16_split import cpu_bf16_hardware
    world = make_world(B=16, G=4, H=1024, seed=4)
    batches = [make_batch(world, s, seed=4) for s in range(3)]
    gold = {u: g for b in batches for u, g in b.gold.items()}
    ctls = [CareController(CareConfig(strategy="care", group_size=4, warmup_steps=1, **c),
                           GoldOracle(gold)) for c in ({"first_layer_gemm": "float32"}, {})]
    for b in batches:
        kw = b.kwargs()
        kw["h_prompt"], kw["h_resp"] = kw["h_prompt"].bfloat16(), kw["h_resp"].bfloat16()
        ref, auto = (c.decide(b.uids, b.ids, **kw) for c in ctls)
        assert bool(ctls[1].trainer._split) == cpu_bf16_hardware()  # the pieces were built
        assert not ctls[0].trainer._split
        assert torch.equal(ref.source, auto.source)
        torch.testing.assert_close(auto.weight, ref.weight, rtol=1e-4, atol=1e-5)
        for c in ctls:
            c.update()
