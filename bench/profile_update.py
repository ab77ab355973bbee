"""Where the classifier update's time goes: phases, op counts, syncs and kernels of one update.

    python bench/profile_update.py --device cuda --shapes 64x8x4096 512x16x4096 \
        --out $OUT/profile_update
    python bench/profile_update.py --device cpu --threads 2 --shapes 16x8x16 64x8x4096

The CARE core's update (``CareController.update``: ``train_steps`` AdamW steps of each classifier
on this step's labelled samples plus replay) took 33-39 ms at 64x8x4096 on an H200 (bench_step,
ninth session), ~85% of the core's step, while the decide's fused op took 0.08 ms: an update is
~1700 dispatched ops, and on a GPU their host cost, not the arithmetic, is the suspect. This
script says where it goes, per update (medians over ``--updates`` profiled updates, after
``--warmup`` decide + update steps that fill the replay buffers):

* ``wall_ms``: the update's wall time (synchronised on CUDA);
* per phase (the trainer's own steps, timed with ``torch.profiler.record_function`` around them:
  ``replay`` sampling, ``batch`` assembly, ``forward`` (module and loss), ``backward``, ``clip``,
  ``zero_grad``, ``adam``, and ``rest``, the remainder: the BatchNorm buffer snapshot, the finite
  checks, metrics): host ms, the ATen ops it dispatches (counted with a TorchDispatchMode in one
  more, unprofiled update: backward's ops included), and on CUDA the kernels' device ms;
* the scalar reads by device (``bool()``/``float()``/``.tolist()`` of a tensor: on CUDA each
  waits for the stream), the CUDA runtime's synchronising and copy calls, and on CUDA the
  device's busy time.

Rows go to ``--out`` as JSON lines (one per shape and phase, plus a total) and a text table. The
phases are taken by wrapping the trainer's methods from outside (the library carries no profiling
hooks); tests/bench checks that every phase is still found.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bench_args
import care_ext.replay as replay
import care_ext.trainer as trainer
from bench_step import batch
from care_ext.config import CareConfig
from care_ext.labels import GoldOracle
from care_ext.step import CareController

PHASES = ("replay", "batch", "forward", "backward", "clip", "zero_grad", "adam", "rest")
"""The update's phases, in the order a gradient step runs them (``rest``: everything else)."""

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaMemcpy", "cudaMemcpyAsync")
"""CUDA runtime calls counted as syncs (a device-to-host cudaMemcpyAsync into pageable memory
waits for the stream; host-to-device ones are counted too, as copies the host issues)."""


class _Phases:
    """Marks the trainer's phases while active: each wrapped callable runs inside
    ``record_function("update/<phase>")`` and sets the phase an op counter attributes ops to."""

    def __init__(self) -> None:
        self.current = ["rest"]
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, owner, name: str, phase: str) -> None:
        fn = getattr(owner, name)
        current = self.current

        def wrapped(*args, **kwargs):
            outer = current[0]
            current[0] = phase
            try:
                with torch.profiler.record_function(f"update/{phase}"):
                    return fn(*args, **kwargs)
            finally:
                current[0] = outer

        self._undo.append((owner, name, fn))
        setattr(owner, name, wrapped)

    def __enter__(self) -> "_Phases":
        T = trainer.ClassifierTrainer
        self.wrap(replay.ReplayBuffer, "sample", "replay")
        self.wrap(replay.ReplayBuffer, "sample_stratified", "replay")
        self.wrap(trainer._StageBatches, "batch", "batch")
        self.wrap(T, "_stage1_loss", "forward")
        self.wrap(T, "_stage2_loss", "forward")
        self.wrap(torch.Tensor, "backward", "backward")
        self.wrap(torch.nn.utils, "clip_grad_norm_", "clip")
        self.wrap(torch.optim.AdamW, "zero_grad", "zero_grad")
        self.wrap(torch.optim.AdamW, "step", "adam")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, fn in reversed(self._undo):
            setattr(owner, name, fn)
        self._undo.clear()


class _OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched (forward and backward alike) by the current phase, and the
    scalar reads (``bool()``/``float()``/``.item()``/``.tolist()`` of a tensor) by device: on CUDA
    each one waits for the stream."""

    def __init__(self, current: list[str]) -> None:
        super().__init__()
        self.current = current
        self.ops: collections.Counter = collections.Counter()
        self.by_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.scalar_reads: collections.Counter = collections.Counter()  # by the tensor's device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if not name.startswith("profiler."):  # the phases' own record_function calls
            self.ops[self.current[0]] += 1
            self.by_op[self.current[0]][name] += 1
            if func.overloadpacket is torch.ops.aten._local_scalar_dense:
                self.scalar_reads[args[0].device.type] += 1
        return func(*args, **(kwargs or {}))


def _controller(device: str, G: int) -> tuple[CareController, dict]:
    gold: dict[str, int] = {}
    cfg = CareConfig(strategy="care", group_size=G, device=device, warmup_steps=2)
    return CareController(cfg, GoldOracle(gold)), gold


def profile_shape(device: str, B: int, G: int, H: int, updates: int, warmup: int) -> dict:
    """Profile ``updates`` updates of one controller at B x G x H after ``warmup`` steps.

    Returns ``{"wall_ms", "phases": {phase: {"host_ms", "device_ms", "ops"}}, "ops", "syncs",
    "scalar_reads": {device type: count}, "device_ms", "top_ops": {phase: [(op, count)]}}``,
    every figure per update (medians of the profiled updates for times and sync calls, the
    counted update for ops and scalar reads)."""
    gen = torch.Generator().manual_seed(0)
    ctl, gold = _controller(device, G)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def next_step(step: int) -> None:
        uids, ids, g, lengths, h_p, h_r = batch(step, B, G, H, gen, device)
        gold.update({u: int(x) for u, x in zip(uids, g)})
        ctl.decide(uids, ids, lengths=lengths, h_prompt=h_p, h_resp=h_r)
        sync()

    for step in range(warmup):
        next_step(step)
        ctl.update()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    walls, per_update = [], []
    with _Phases() as phases:
        for i in range(updates):
            next_step(warmup + i)
            with torch.profiler.profile(activities=acts) as prof:
                t0 = time.perf_counter()
                ctl.update()
                sync()
                walls.append((time.perf_counter() - t0) * 1e3)
            per_update.append(_tally(prof, walls[-1]))
        next_step(warmup + updates)
        counter = _OpCounter(phases.current)
        with counter:
            ctl.update()
        sync()
    med = lambda key: statistics.median(u[key] for u in per_update)  # noqa: E731
    out = {"wall_ms": statistics.median(walls), "syncs": med("syncs"),
           "scalar_reads": dict(counter.scalar_reads), "device_ms": med("device_ms"),
           "ops": sum(counter.ops.values()), "phases": {},
           "top_ops": {p: counter.by_op[p].most_common(6) for p in PHASES}}
    for p in PHASES:
        host = statistics.median(u["host"].get(p, 0.0) for u in per_update)
        dev = statistics.median(u["dev"].get(p, 0.0) for u in per_update)
        out["phases"][p] = {"host_ms": host, "device_ms": dev, "ops": counter.ops.get(p, 0)}
    return out


def _tally(prof, wall_ms: float) -> dict:
    """One profiled update: host ms per phase (its record_function ranges; ``rest`` is the wall
    time less the phases), device ms per phase (each kernel, memcpy or memset goes to the phase
    whose range holds the host call that launched it, whichever thread made the call: the
    autograd engine runs CUDA backward ops on its own thread), CUDA sync calls and the device's
    total busy time."""
    events = prof.events()
    ranges = sorted(((e.name.split("/", 1)[1], e.time_range.start, e.time_range.end)
                     for e in events if e.name.startswith("update/")), key=lambda r: r[1])
    outer: list[tuple[str, float, float]] = []  # a range inside another counts for the outer one
    for r in ranges:
        if not outer or r[1] >= outer[-1][2]:
            outer.append(r)
    host: dict[str, float] = collections.defaultdict(float)
    for name, start, end in outer:
        host[name] += (end - start) / 1e3
    host["rest"] = max(0.0, wall_ms - sum(host.values()))
    starts = [r[1] for r in outer]

    def phase_at(t_us: float) -> str:
        i = bisect.bisect_right(starts, t_us) - 1
        return outer[i][0] if i >= 0 and t_us <= outer[i][2] else "rest"

    syncs = sum(1 for e in events if e.name in SYNC_CALLS)
    dev: dict[str, float] = collections.defaultdict(float)
    device_ms = 0.0
    kineto = getattr(prof.profiler, "kineto_results", None)
    if kineto is not None:
        raw = kineto.events()
        # the FunctionEvents' times are µs from the trace's start (torch's own conversion); the
        # raw events' are absolute ns
        start_ns = kineto.trace_start_ns()
        launch_us = {e.correlation_id(): (e.start_ns() - start_ns) / 1e3
                     for e in raw if e.device_type() == torch.autograd.DeviceType.CPU}
        for e in raw:
            if e.device_type() != torch.autograd.DeviceType.CUDA:
                continue
            ms = e.duration_ns() / 1e6
            device_ms += ms
            t = launch_us.get(e.linked_correlation_id())
            dev["rest" if t is None else phase_at(t)] += ms
    return {"host": dict(host), "dev": dict(dev), "device_ms": device_ms, "syncs": syncs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", type=bench_args.device, default=bench_args.default_device())
    ap.add_argument("--shapes", nargs="*", type=bench_args.shape,
                    default=["64x8x4096", "512x16x4096"])
    ap.add_argument("--updates", type=bench_args.positive_int, default=3,
                    help="profiled updates per shape (medians)")
    ap.add_argument("--warmup", type=bench_args.positive_int, default=4,
                    help="decide + update steps before (the replay buffers fill)")
    ap.add_argument("--threads", type=bench_args.positive_int, default=None,
                    help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default="bench/out/profile_update", help="output path prefix")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, lines = [], []
    for shape in args.shapes:
        B, G, H = bench_args.dims(shape)
        r = profile_shape(args.device, B, G, H, args.updates, args.warmup)
        dev = f", device busy {r['device_ms']:.1f} ms" if args.device == "cuda" else ""
        reads = ", ".join(f"{n} on {d}" for d, n in sorted(r["scalar_reads"].items())) or "none"
        lines.append(f"update {shape} ({args.device}, {torch.get_num_threads()} threads): "
                     f"{r['wall_ms']:.1f} ms, {r['ops']} ops, scalar reads {reads}, "
                     f"{r['syncs']:.0f} CUDA sync/copy calls{dev}")
        lines.append(f"  {'phase':<10} {'host ms':>8} {'share':>6} {'ops':>5} {'µs/op':>6}"
                     + (f" {'device ms':>9}" if args.device == "cuda" else "") + "  top ops")
        for p in PHASES:
            ph = r["phases"][p]
            per_op = ph["host_ms"] * 1e3 / ph["ops"] if ph["ops"] else 0.0
            top = ", ".join(f"{n.split('.')[-1]} {c}" for n, c in r["top_ops"][p][:4])
            lines.append(f"  {p:<10} {ph['host_ms']:8.2f} {ph['host_ms'] / r['wall_ms']:6.1%} "
                         f"{ph['ops']:5d} {per_op:6.1f}"
                         + (f" {ph['device_ms']:9.2f}" if args.device == "cuda" else "")
                         + f"  {top}")
            rows.append(dict(device=args.device, shape=shape, threads=torch.get_num_threads(),
                             phase=p, **ph, torch=torch.__version__))
        rows.append(dict(device=args.device, shape=shape, threads=torch.get_num_threads(),
                         phase="total", host_ms=r["wall_ms"], device_ms=r["device_ms"],
                         ops=r["ops"], syncs=r["syncs"], scalar_reads=r["scalar_reads"],
                         torch=torch.__version__))
    path = bench_args.write_jsonl(args.out, rows)
    text = "\n".join(lines)
    path.with_suffix(".txt").write_text(text + "\n")
    print(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
