"""End-to-end cost of the CARE core per RL step: CareController.decide + update.

Synthetic batches of CARE's shapes (answer ids with a planted majority, lengths, bf16 hidden
states), fresh prompt uids every step so labels are really bought (GoldOracle; the label store
in memory, or in a SQLite file with ``--store-dir``).
Reports the median decide and update wall times after a warm-up, per (device, B, G, H), and the
share of the step that the classifier update takes.

``--projected``: decide on hidden states already reduced by the classifiers' first layers (what
``--care.worker_reduce first_layer`` ships from the OpenRLHF policy workers, care_ext.projection);
the projection itself is the workers' job and is timed apart (``project_ms``, same device), the
raw rows of the trained prompts come from memory.

    python bench/bench_step.py --device cpu --shapes 64x8x4096 --threads 1
    python bench/bench_step.py --device cpu --shapes 64x8x4096 --threads 1 --projected
    python bench/bench_step.py --device cpu --threads 1 --first-layer-backward autograd fused split
    python bench/bench_step.py --device cpu --threads 2 --first-layer-gemm float32 bf16x3
    python bench/bench_step.py --device cpu --threads 2 --update sync background --gap-ms 100
    python bench/bench_step.py --device cpu --threads 16 --first-layer-gemm bf16x3 \
        --first-layer-pack off on
    python bench/bench_step.py --device cuda --out $OUT/bench_step

``--update background`` trains on the controller's background thread
(CareConfig.background_update): ``update_ms`` is then what the caller waits for, the update() call
plus the wait before the next decide after ``--gap-ms`` of other work, and ``train_ms`` the
training itself.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import bench_args
from bench_ops import cpu_name

import care_ext
from care_ext.bn_linear import BACKWARDS
from care_ext.config import CareConfig
from care_ext.labels import GoldOracle, LabelStore
from care_ext.projection import ProjectedHidden
from care_ext.step import CareController


def batch(step: int, B: int, G: int, H: int, gen: torch.Generator, device: str):
    """One step's inputs: ids with a majority answer, gold ids, lengths, bf16 hidden states."""
    n = torch.randint(1, 4, (B, 1), generator=gen)
    ids = (torch.rand(B, G, generator=gen) * n).long()
    ids[torch.rand(B, G, generator=gen) < 0.1] = -1
    gold = torch.randint(0, 3, (B,), generator=gen)
    uids = [f"s{step}-p{b}" for b in range(B)]
    lengths = torch.randint(50, 4000, (B, G), generator=gen)
    h_p = torch.randn(B, H, generator=gen).to(torch.bfloat16).to(device)
    h_r = torch.randn(B, G, H, generator=gen).to(torch.bfloat16).to(device)
    return uids, ids, gold, lengths, h_p, h_r


def packs(ctl: CareController) -> bool:
    """Whether the controller's decide multiplies on weights packed once per update: split
    first-layer pieces packed for oneDNN's BRGeMM (the split it passes the step holds 4 tensors;
    CareConfig.first_layer_pack on a CPU with AMX), or float32 weights packed for the CPU step's
    AVX2 GEMM (care_ext.ops.pack_cpu_step_weights, where the step runs it)."""
    tr = ctl.trainer
    if tr is None:
        return False
    if tr.split_terms > 0:
        return len(tr.step_split(tr.split_terms)) == 4
    return tr.step_packed_weights() is not None


def run(device: str, B: int, G: int, H: int, steps: int, warmup: int, strategy: str,
        projected: bool = False, first_layer_backward: str = "auto",
        first_layer_gemm: str = "auto", background: bool = False, gap_ms: float = 0.0,
        store_dir: str | None = None, first_layer_pack: str = "auto",
        release_threads: bool = True) -> dict:
    """decide + update of one controller for warmup + steps steps; medians of the steps after the
    warm-up. update_ms is what the update costs the caller: the update() call, plus, after
    ``gap_ms`` of other work (a sleep: the policy update and the next rollouts in a real loop),
    the wait for a background update (CareConfig.background_update) before the next decide;
    train_ms is the training itself wherever it ran. ``store_dir``: the label store is a fresh
    SQLite file there (every label a committed transaction, as in a real run) instead of
    memory."""
    gen = torch.Generator().manual_seed(0)
    store = None
    if store_dir is not None:
        Path(store_dir).mkdir(parents=True, exist_ok=True)
        path = Path(store_dir) / f"bench_step_{os.getpid()}_{time.time_ns()}.sqlite"
        store = LabelStore(path)
    gold: dict[str, int] = {}
    ctl = CareController(CareConfig(strategy=strategy, group_size=G, device=device, warmup_steps=2,
                                    first_layer_backward=first_layer_backward,
                                    first_layer_gemm=first_layer_gemm,
                                    first_layer_pack=first_layer_pack,
                                    background_update=background,
                                    background_release_threads=release_threads),
                        GoldOracle(gold), store)
    t_decide, t_update, t_project, t_train = [], [], [], []
    timed: list[float] = []  # the training's own time per update, on whatever thread it ran
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for step in range(warmup + steps):
        uids, ids, g, lengths, h_p, h_r = batch(step, B, G, H, gen, device)
        gold.update({u: int(x) for u, x in zip(uids, g)})
        proj = ctl.first_layer_projection() if projected else None
        feats = dict(h_prompt=h_p, h_resp=h_r)
        if proj is not None:  # from the second step on (the first builds the classifiers)
            proj = proj.to(device)
            sync()
            tp = time.perf_counter()
            pp, pr = proj.apply(h_p, h_r)
            sync()
            if step >= warmup:
                t_project.append(time.perf_counter() - tp)
            feats = dict(projected=ProjectedHidden(pp, pr, proj.version,
                                                   lambda rows, hp=h_p, hr=h_r: (hp[rows], hr[rows])))
        sync()
        t0 = time.perf_counter()
        ctl.decide(uids, ids, lengths=lengths, **feats)
        sync()
        t1 = time.perf_counter()
        if ctl.trainer is not None and "train" not in vars(ctl.trainer):  # not wrapped yet

            def timed_train(samples, train=ctl.trainer.train):
                ts = time.perf_counter()
                out = train(samples)
                sync()
                timed.append(time.perf_counter() - ts)
                return out

            ctl.trainer.train = timed_train
        ctl.update()
        sync()
        t2 = time.perf_counter()
        if gap_ms > 0:
            time.sleep(gap_ms / 1e3)
        t3 = time.perf_counter()
        ctl.wait_update()
        sync()
        t4 = time.perf_counter()
        if step >= warmup:
            t_decide.append(t1 - t0)
            t_update.append(t2 - t1 + t4 - t3)
            if timed:
                t_train.append(timed[-1])
    d, u = statistics.median(t_decide) * 1e3, statistics.median(t_update) * 1e3
    if store is not None:
        ctl.wait_update()
        store.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    return dict(device=device, shape=f"{B}x{G}x{H}", strategy=strategy, decide_ms=d, update_ms=u,
                update_share=u / (d + u), steps=steps, projected=projected,
                update_mode=("background" if release_threads else "background-keep")
                if background else "sync", gap_ms=gap_ms,
                store="file" if store_dir is not None else "memory",
                train_ms=statistics.median(t_train) * 1e3 if t_train else None,
                first_layer_backward=first_layer_backward, first_layer_gemm=first_layer_gemm,
                split_terms=ctl.trainer.split_terms if ctl.trainer is not None else None,
                first_layer_pack=first_layer_pack,
                packed=packs(ctl),
                project_ms=statistics.median(t_project) * 1e3 if t_project else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", type=bench_args.device, default=bench_args.default_device())
    ap.add_argument("--shapes", nargs="*", type=bench_args.shape,
                    default=["64x8x4096", "512x16x4096"])
    ap.add_argument("--strategy", default="care")
    ap.add_argument("--steps", type=bench_args.positive_int, default=8,
                    help="measured steps (decide + update) per configuration")
    ap.add_argument("--warmup", type=bench_args.non_negative_int, default=3,
                    help="steps run first and not measured")
    ap.add_argument("--threads", type=bench_args.positive_int, default=None,
                    help="torch CPU threads")
    ap.add_argument("--projected", action="store_true",
                    help="decide on first-layer projections (--care.worker_reduce first_layer)")
    ap.add_argument("--first-layer-backward", nargs="+", default=["auto"],
                    choices=list(BACKWARDS),
                    help="classifier training's first-layer backward (CareConfig."
                         "first_layer_backward); several: each in turn per shape, side by side")
    ap.add_argument("--first-layer-gemm", nargs="+", default=["auto"],
                    choices=["auto", "float32", "bf16x3", "bf16x2"],
                    help="the decide step's first layers (CareConfig.first_layer_gemm; rows record "
                         "what 'auto' resolved to as split_terms); several: each in turn per "
                         "shape, side by side")
    ap.add_argument("--first-layer-pack", nargs="+", default=["auto"],
                    choices=["auto", "off", "on"],
                    help="CareConfig.first_layer_pack (split first layers packed once per update "
                         "for oneDNN's BRGeMM on AMX CPUs, float32 ones for the AVX2 GEMM where "
                         "the CPU step runs it; rows record whether it packed); "
                         "several: each in turn per shape")
    ap.add_argument("--update", nargs="+", default=["sync"],
                    choices=["sync", "background", "background-keep"],
                    help="CareConfig.background_update off / on; background-keep: on, without "
                         "releasing the caller's idle OpenMP workers first "
                         "(CareConfig.background_release_threads=False); several: each in turn "
                         "per shape")
    ap.add_argument("--gap-ms", type=float, default=0.0,
                    help="other work (a sleep) between update() and the next decide: what a "
                         "background update can hide behind (a policy step takes seconds)")
    ap.add_argument("--store-dir", default=None,
                    help="keep the label store in a fresh SQLite file in this directory (the "
                         "file system's commit cost counts, as in a real run) instead of memory")
    ap.add_argument("--out", default="bench/out/bench_step")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    rows = []
    for shape in args.shapes:
        B, G, H = bench_args.dims(shape)
        for flb, gemm, pack, upd in [(f, g, k, u) for f in args.first_layer_backward
                                     for g in args.first_layer_gemm
                                     for k in args.first_layer_pack for u in args.update]:
            r = run(args.device, B, G, H, args.steps, args.warmup, args.strategy, args.projected, flb,
                    gemm, upd != "sync", args.gap_ms, args.store_dir, pack,
                    release_threads=upd != "background-keep")
            # OpenMP placement too: on a 2-core VM the decide after a background update took
            # 12-15 ms unbound and 8 ms with OMP_PROC_BIND=true (bench/RESULTS.md)
            r.update(device_name=name, torch=torch.__version__, threads=torch.get_num_threads(),
                     native=care_ext.HAS_NATIVE, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                     build_info=care_ext.build_info(),
                     omp_proc_bind=os.environ.get("OMP_PROC_BIND"),
                     omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
            rows.append(r)
            proj = f", projection {r['project_ms']:.1f} ms" if r["project_ms"] is not None else ""
            print(f"{args.device} {shape:>12} {args.strategy}{' projected' if args.projected else ''}"
                  f" [first layers: {flb}, {gemm} ({r['split_terms']})"
                  f"{', packed' if r['packed'] else ''}; {upd} update, gap "
                  f"{args.gap_ms:g} ms]: decide {r['decide_ms']:.1f} ms, update "
                  f"{r['update_ms']:.1f} ms ({100 * r['update_share']:.0f}% of the step; training "
                  f"{r['train_ms'] or 0:.1f} ms){proj}",
                  flush=True)
    print(f"wrote {bench_args.write_jsonl(args.out, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
