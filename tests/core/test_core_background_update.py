"""CareConfig.background_update: the classifiers train on a background thread between update()
and the next call that reads them; decisions and classifiers equal the synchronous update's."""
import threading

import pytest
import torch

from care_ext.config import CareConfig
from care_ext.labels import GoldOracle
from care_ext.step import CareController

from core_synth import make_batch, make_world

B, G, H = 24, 8, 16


def _run(background, steps=6, save_at=None, tmp_path=None, hidden=H, device="cpu",
         first_layer_gemm="auto"):
    world = make_world(B=B, G=G, H=hidden)
    batches = [make_batch(world, s % 4) for s in range(steps)]  # prompts recur: cached labels too
    if first_layer_gemm != "auto":  # the split step reads bf16 hidden states
        for b in batches:
            b.h_prompt, b.h_resp = b.h_prompt.bfloat16(), b.h_resp.bfloat16()
    gold = {u: g for b in batches for u, g in b.gold.items()}
    cfg = CareConfig(strategy="care", group_size=G, warmup_steps=2, seed=3,
                     background_update=background, device=device,
                     first_layer_gemm=first_layer_gemm)
    ctl = CareController(cfg, GoldOracle(gold))
    decisions, metrics = [], []
    for s, b in enumerate(batches):
        decisions.append(ctl.decide(b.uids, b.ids, **b.kwargs()))
        metrics.append(ctl.update())
        if s == save_at:  # right after a background update started: save waits for it
            ctl.save(tmp_path / "ckpt.pt")
    metrics.append(ctl.wait_update())
    return ctl, decisions, metrics


def _decided_once(steps):
    """A background-update controller at lab width after its first decide, and its batches."""
    world = make_world(B=B, G=G, H=H)
    batches = [make_batch(world, s) for s in range(steps)]
    gold = {u: g for b in batches for u, g in b.gold.items()}
    ctl = CareController(CareConfig(strategy="care", group_size=G, warmup_steps=1, seed=1,
                                    background_update=True), GoldOracle(gold))
    b = batches[0]
    ctl.decide(b.uids, b.ids, **b.kwargs())
    return ctl, batches


@pytest.mark.parametrize("hidden, device, gemm", [
    (H, "cpu", "auto"), (1024, "cpu", "auto"), (1024, "cpu", "bf16x3"),
    pytest.param(1024, "cuda", "auto", marks=pytest.mark.cuda)],
    ids=["lab-width", "llm-width", "llm-width-split", "llm-width-cuda"])
def test_background_update_decides_like_the_synchronous_one(hidden, device, gemm):
    """Every decision (sources, rewards, weights, Stage-II scores) and the final classifiers and
    optimisers are bit-identical; each background update() returns the previous one's metrics,
    which equal the synchronous update's of that step (wait_update gives the last). On CUDA the
    background thread launches on its own current stream (the device's default) and cuBLAS
    handle. With split first layers (bf16 hidden states) the background thread also folds and
    splits the next decide's weights (ClassifierTrainer.prepare_decide)."""
    sync, d_sync, m_sync = _run(False, hidden=hidden, device=device, first_layer_gemm=gemm)
    bg, d_bg, m_bg = _run(True, hidden=hidden, device=device, first_layer_gemm=gemm)
    assert bg._background_updates == 6 and sync._background_updates == 0  # it did run apart
    for a, b in zip(d_bg, d_sync, strict=True):
        assert torch.equal(a.source, b.source)
        assert torch.equal(a.rewards, b.rewards) and torch.equal(a.weight, b.weight)
        assert torch.equal(a.score.nan_to_num(-1), b.score.nan_to_num(-1))
    assert m_bg[0] == {} and m_bg[1:-1] == m_sync[:-2] and m_bg[-1] == m_sync[-2]
    assert any("train/stage1_loss" in m for m in m_sync)
    for mod in ("stage1", "stage2"):
        ref = getattr(sync.trainer, mod).state_dict()
        for k, v in getattr(bg.trainer, mod).state_dict().items():
            assert torch.equal(v, ref[k]), (mod, k)
    assert len(bg.trainer.replay1) == len(sync.trainer.replay1) > 0


def test_save_waits_for_the_background_update(tmp_path):
    """A checkpoint taken right after a background update() holds the trained classifiers: it
    equals the synchronous run's checkpoint at that step."""
    _run(True, steps=4, save_at=2, tmp_path=tmp_path)
    bg = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    _run(False, steps=4, save_at=2, tmp_path=tmp_path)
    sync = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert bg["trainer"]["updates"] == sync["trainer"]["updates"] == 3
    for k, v in sync["trainer"]["stage1"].items():
        assert torch.equal(bg["trainer"]["stage1"][k], v), k


def test_background_update_runs_while_the_caller_goes_on_and_its_error_surfaces():
    """update() returns while the training is still running (it blocks here on an event the
    test sets afterwards); the next decide waits for it. An error in the background training is
    raised by the next call that waits (decide), once."""
    ctl, batches = _decided_once(4)
    release, started = threading.Event(), threading.Event()
    train = ctl.trainer.train

    def slow_train(samples):
        started.set()
        assert release.wait(10)
        return train(samples)

    ctl.trainer.train = slow_train
    assert ctl.update() == {}
    assert started.wait(10) and ctl._pending is not None and not ctl._pending[1].done()
    release.set()
    b = batches[1]
    ctl.decide(b.uids, b.ids, **b.kwargs())  # waits for the update
    assert ctl.trainer.updates == 1 and ctl._pending is None

    def failing_train(samples):
        raise RuntimeError("classifier training failed")

    ctl.trainer.train = failing_train
    ctl.update()
    b = batches[2]
    with pytest.raises(RuntimeError, match="classifier training failed"):
        ctl.decide(b.uids, b.ids, **b.kwargs())
    ctl.trainer.train = train
    ctl.decide(b.uids, b.ids, **b.kwargs())  # raised once; the controller goes on
    assert ctl.update(background=False)["train/samples"] > 0  # per-call override


def test_background_update_flag_is_checked():
    with pytest.raises(ValueError, match="background_update must be True or False"):
        CareConfig(background_update="yes")


def test_background_update_prepares_the_next_decides_weights():
    """After a background update the folded weights and the split pieces the decides asked for
    are cached already (computed on the background thread), and equal a fresh fold and split of
    the trained classifiers; a synchronous update leaves them to the next decide."""
    from care_ext.bf16_split import first_layer_split

    bg, _, _ = _run(True, steps=3, hidden=1024, first_layer_gemm="bf16x3")
    sync, _, _ = _run(False, steps=3, hidden=1024, first_layer_gemm="bf16x3")
    assert sync.trainer._folded is None and sync.trainer._split == {}
    t = bg.trainer
    assert t._folded is not None and set(t._split) == {3}
    fresh = t.stage1.fold(), t.stage2.fold()
    for got, want in zip(t._folded, fresh, strict=True):
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    for a, b in zip(t._split[3], first_layer_split(*fresh, 1024, 3), strict=True):
        assert torch.equal(a, b)
    # first_layer_pack='auto' with a background update: packed there too, where the CPU has AMX
    from care_ext.bf16_split import cpu_brgemm_available, pack_first_layer_split
    assert t.packs and not sync.trainer.packs
    if cpu_brgemm_available():
        want = pack_first_layer_split(first_layer_split(*fresh, 1024, 3))
        for a, b in zip(t._packed[3], want, strict=True):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    else:
        assert t._packed.get(3) is None


@pytest.mark.native  # the packing is the native library's
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="the AVX2 GEMM needs an x86 CPU with AVX2 and FMA")
def test_background_update_packs_the_float32_step_weights(monkeypatch):
    """float32 first layers on the AVX2 GEMM with first_layer_pack='auto' and a background
    update: the update's thread packs the trained classifiers' folded weights (equal to a fresh
    packing) once a decide has asked for them; a synchronous update leaves them to the decide."""
    from care_ext.ops import pack_cpu_step_weights

    monkeypatch.setenv("CARE_EXT_CPU_GEMM", "avx2")
    bg, dec_bg, _ = _run(True, steps=3, first_layer_gemm="float32")
    sync, dec_sync, _ = _run(False, steps=3, first_layer_gemm="float32")
    assert sync.trainer._f32_packed is None and not sync.trainer.packs
    t = bg.trainer
    assert t.packs and t._f32_packed is not None
    fresh = t.stage1.fold(), t.stage2.fold()
    assert torch.equal(t._f32_packed, pack_cpu_step_weights(*fresh, t.hidden_size))
    for a, b in zip(dec_bg, dec_sync, strict=True):  # packed or not: the same decisions
        assert torch.equal(a.source, b.source)


def test_a_failed_preparation_is_left_to_the_decide():
    """prepare_decide is an optimisation: when it raises, the background update still returns its
    training's metrics, and the next decide folds the classifiers itself."""
    ctl, batches = _decided_once(3)

    def failing_prepare():
        raise RuntimeError("preparation failed")

    ctl.trainer.prepare_decide = failing_prepare
    ctl.update()
    assert ctl.wait_update()["train/samples"] > 0
    assert ctl.trainer._folded is None
    b = batches[1]
    d = ctl.decide(b.uids, b.ids, **b.kwargs())
    assert ctl.trainer._folded is not None and len(d.source) == B


@pytest.mark.parametrize("release", [True, False])
def test_background_update_releases_the_callers_idle_omp_workers(release, monkeypatch):
    """CareConfig.background_release_threads (default on): before a background update on the CPU
    starts, update() releases the calling thread's idle OpenMP workers (care_ext.threads), once per
    background update; never for a synchronous one or with the flag off. The classifiers are the
    same either way (the same operations)."""
    import care_ext.step as step_mod

    calls = []
    real = step_mod.release_idle_threads

    def counting():
        calls.append(threading.current_thread().name)
        return real()

    monkeypatch.setattr(step_mod, "release_idle_threads", counting)
    world = make_world(B=B, G=G, H=H)
    batches = [make_batch(world, s % 4) for s in range(4)]
    gold = {u: g for b in batches for u, g in b.gold.items()}
    ctls = []
    for background in (True, False):
        cfg = CareConfig(strategy="care", group_size=G, warmup_steps=2, seed=3,
                         background_update=background, background_release_threads=release)
        ctl = CareController(cfg, GoldOracle(gold))
        for b in batches:
            ctl.decide(b.uids, b.ids, **b.kwargs())
            ctl.update()
        ctl.wait_update()
        ctls.append(ctl)
    want = ctls[0]._background_updates if release else 0
    assert want in (0, 4) and len(calls) == want
    assert all(name == threading.main_thread().name for name in calls)
    for mod in ("stage1", "stage2"):
        ref = getattr(ctls[1].trainer, mod).state_dict()
        for k, v in getattr(ctls[0].trainer, mod).state_dict().items():
            assert torch.equal(v, ref[k]), (mod, k)


def test_release_idle_threads_releases_and_the_pool_comes_back():
    """care_ext.threads.release_idle_threads: True where the build has OpenMP
    (build_info()["intra_op_parallel"]) and the runtime released the pool; parallel CPU work
    afterwards runs again on new workers and gives the same values."""
    import care_ext
    from care_ext.threads import release_idle_threads

    x = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))
    before = torch.native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5)[0]
    released = release_idle_threads()
    assert released == bool(care_ext.build_info().get("intra_op_parallel"))
    after = torch.native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5)[0]
    assert torch.equal(before, after)
