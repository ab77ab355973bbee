"""Online training of CARE's two classifiers on bought labels plus replay (§5).

Per RL step (after the policy update), ``train_steps`` times: Stage-I takes one AdamW step on this
step's samples plus ``replay_batch`` uniform history samples, then Stage-II on this step's samples
plus ``replay_batch`` history samples stratified by count label. The step's samples join the FIFO
buffers only afterwards, so history never contains the current step. Nothing here ever sees a
prompt whose label was not bought: samples are built only from labelled prompts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .bf16_split import first_layer_split, pack_first_layer_split, resolve_first_layer_gemm
from .classifiers import CareClassifier, balanced_ce, stage1_classifier, stage2_classifier
from .config import CareConfig
from .ops import core_step_layout, pack_cpu_step_weights
from .replay import ReplayBuffer, Sample, stack, stacked_layout


class _StageBatches:
    """One stage's training batches over one update: this update's samples stacked on the
    device once, each gradient step's replay samples written after them.

    ``batch(replay)`` equals ``stack(current + replay)`` moved to ``device``, field by field
    (:func:`care_ext.replay.stack`), but the current samples, the bulk of every batch, are
    stacked and copied to the device once per update instead of once per gradient step (on
    CUDA, a host-to-device copy of their hidden states each time). On the CPU the samples are
    stacked straight into the buffers (no stacked temporary and copy: at 512x16x4096 two
    13.5 MB copies per update). The buffers live as long as this object, one update; the
    tensors ``batch`` returns are views of them, valid until the next call (each gradient
    step's graph is done with them by then).

    Args:
        current: this update's samples (at least one). extra: the most replay samples a batch
            adds. device: where the batches go.
    """

    def __init__(self, current: list[Sample], extra: int, device) -> None:
        self.current, self.device, self.n = current, torch.device(device), len(current)
        self.rows = self.n + extra  # what the buffers hold
        self.layout = stacked_layout(current)
        self.bufs = {k: torch.empty((self.rows, *shape), dtype=dtype, device=self.device)
                     for k, (dtype, shape) in self.layout.items()}
        self._write(current, 0)

    def _write(self, samples: list[Sample], start: int) -> None:
        """``samples`` into rows start .. start + len(samples) of the buffers."""
        end, first = start + len(samples), samples[0]
        if self.device.type == first.h_prompt.device.type == first.h_resp.device.type == "cpu":
            stack(samples, out={k: b[start:end] for k, b in self.bufs.items()})
            return
        for k, v in stack(samples).items():
            self.bufs[k][start:end].copy_(v)

    def batch(self, replay: list[Sample]) -> dict[str, Tensor]:
        m = self.n + len(replay)
        if replay:
            if m > self.rows or stacked_layout(replay) != self.layout:
                # not what the buffers hold (more rows, or dtypes that stack would promote
                # differently): stacked as before
                return {k: v.to(self.device) for k, v in stack(self.current + replay).items()}
            self._write(replay, self.n)
        return {k: b[:m] for k, b in self.bufs.items()}


def _adamw(module: torch.nn.Module, cfg: CareConfig) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over all parameters instead of ~10 per-tensor ops per
    parameter in Python: the optimiser was a third of the update's time on one CPU thread)."""
    return torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=True)


class ClassifierTrainer:
    """Owns both classifiers, their AdamW optimisers, the two replay buffers and the replay RNG.

    Args:
        cfg: the run config (dims, losses, optimiser, replay).
        hidden_size: H. regression: Stage-II predicts CAG (C = 1, MSE) instead of count classes.
    """

    def __init__(self, cfg: CareConfig, hidden_size: int, regression: bool = False) -> None:
        self.cfg, self.hidden_size, self.regression = cfg, hidden_size, regression
        G = cfg.group_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.stage1: CareClassifier = stage1_classifier(hidden_size, G, cfg).to(cfg.device)
            self.stage2: CareClassifier = stage2_classifier(hidden_size, G, cfg, regression).to(cfg.device)
        self.stage1.eval()
        self.stage2.eval()
        self.opt1 = _adamw(self.stage1, cfg)
        self.opt2 = _adamw(self.stage2, cfg)
        self.replay1 = ReplayBuffer(cfg.replay_capacity)
        self.replay2 = ReplayBuffer(cfg.replay_capacity)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.updates = 0
        self._folded: tuple[list[Tensor], list[Tensor]] | None = None
        self.split_terms = resolve_first_layer_gemm(cfg.first_layer_gemm, cfg.device, hidden_size)
        """bf16 pieces per first-layer weight in the decide step (0: float32 GEMMs)."""
        self._split: dict[int, list[Tensor]] = {}
        self._split_buffers: dict[int, list[Tensor]] = {}  # reused by every re-split
        self._packed: dict[int, list[Tensor] | None] = {}  # the pieces packed (CPU with AMX)
        self._packed_buffers: dict[int, list[Tensor]] = {}  # reused by every re-pack
        self._f32_packed: Tensor | None = None  # the float32 step's weights packed (AVX2 CPUs)
        self._f32_packed_buffer: Tensor | None = None  # reused by every re-pack
        self._f32_packs_asked = False  # a decide asked for them (prepare_decide packs then)
        self._snapshots: dict[int, list[Tensor]] = {}  # per module: its buffers before a step

    # ------------------------------------------------------------------------------------------
    def folded(self) -> tuple[list[Tensor], list[Tensor]]:
        """(Stage-I, Stage-II) folded weights of the eval-mode modules (cached between updates).

        Stored as :func:`care_ext.ops.core_step_layout` says (same values, every op takes any
        strides): on CUDA every matrix column-major (the layout the fused step's kernel reads
        coalesced); on the CPU at LLM hidden sizes both stages' first layers side by side (one GEMM
        for both); else row-major contiguous, as :meth:`CareClassifier.fold` returns them. On the
        CPU with split first layers (:attr:`split_terms` > 0), row-major: the split step takes its
        hidden products from :meth:`first_layer_split`'s pieces."""
        if self._folded is None:
            raw = self.stage1.fold(), self.stage2.fold()
            if self.split_terms > 0 and not raw[0][0].is_cuda:
                # the CPU split step reads only the first layers' feature columns from these (its
                # hidden products come from the pieces), and the pieces are split from row-major
                # weights fastest: the side-by-side copy would go unused
                self._folded = raw
            else:
                self._folded = core_step_layout(*raw, self.hidden_size)
        return self._folded

    def first_layer_split(self, terms: int) -> list[Tensor]:
        """The folded first layers' hidden columns as ``terms`` bf16 pieces for the split steps'
        bf16 GEMMs (:func:`care_ext.bf16_split.first_layer_split`; cached between updates).

        The pieces are written into the same buffers after every update (fresh tensors cost the
        CPU core first-touch page faults each time): the tensors returned are valid until the
        next update."""
        if terms not in self._split:
            w1, w2 = self.folded()
            self._split[terms] = first_layer_split(w1, w2, self.hidden_size, terms,
                                                   out=self._split_buffers.get(terms))
            self._split_buffers[terms] = self._split[terms]
        return self._split[terms]

    @property
    def packs(self) -> bool:
        """Whether :meth:`step_split` packs the pieces: ``CareConfig.first_layer_pack`` 'on', or
        'auto' with ``background_update`` (the update's thread packs, in :meth:`prepare_decide`)."""
        mode = self.cfg.first_layer_pack
        return mode == "on" or (mode == "auto" and self.cfg.background_update)

    def step_split(self, terms: int) -> list[Tensor]:
        """The ``first_layer_split`` argument of the decide's step: :meth:`first_layer_split`'s 2
        pieces, followed, where :attr:`packs` says so, by their packing for oneDNN's BRGeMM
        (:func:`care_ext.bf16_split.pack_first_layer_split`; none on CPUs without AMX). Cached
        between updates, packed into the same buffers after each."""
        pieces = self.first_layer_split(terms)
        if not self.packs:
            return pieces
        if terms not in self._packed:
            self._packed[terms] = pack_first_layer_split(pieces,
                                                         out=self._packed_buffers.get(terms))
            if self._packed[terms] is not None:
                self._packed_buffers[terms] = self._packed[terms]
        return pieces + (self._packed[terms] or [])

    def step_packed_weights(self) -> Tensor | None:
        """The ``packed_weights`` argument of the decide's float32 step: :meth:`folded` packed
        for the CPU step's AVX2 GEMM (:func:`care_ext.ops.pack_cpu_step_weights`), where
        :attr:`packs` says so and the step runs that GEMM (float32 first layers, a CPU device,
        :func:`care_ext.ops.cpu_step_packs_weights`), else None. Cached between updates, packed
        into the same buffer after each (valid until the next update)."""
        if (not self.packs or self.split_terms > 0 or torch.device(self.cfg.device).type != "cpu"):
            return None
        self._f32_packs_asked = True
        if self._f32_packed is None:
            w1, w2 = self.folded()
            self._f32_packed = pack_cpu_step_weights(w1, w2, self.hidden_size,
                                                     out=self._f32_packed_buffer)
            if self._f32_packed is not None:
                self._f32_packed_buffer = self._f32_packed
        return self._f32_packed

    def _drop_decide_cache(self) -> None:
        """Forget what :meth:`folded`, :meth:`first_layer_split`, :meth:`step_split` and
        :meth:`step_packed_weights` cached: the classifiers changed (an update, a loaded state).
        The buffers stay for the re-split and re-pack to write into."""
        self._folded = None
        self._split = {}
        self._packed = {}
        self._f32_packed = None

    def prepare_decide(self) -> None:
        """Fold the classifiers (:meth:`folded`), split their first layers for every piece count
        a decide has asked for and pack them (:meth:`step_split`), and pack the float32 step's
        weights if a decide has asked for them (:meth:`step_packed_weights`) now, so that the
        next decide finds them cached. The background update calls it after training: the ~1 ms
        of folding and splitting at H = 4096 (and the packing) then leaves the decide's critical
        path. Same tensors as the decide would compute itself."""
        self.folded()
        for terms in sorted(self._split_buffers):  # the piece counts split so far
            self.step_split(terms)
        if self._f32_packs_asked:
            self.step_packed_weights()

    def _stage1_loss(self, b: dict[str, Tensor]) -> tuple[Tensor, float]:
        cfg = self.cfg
        logits, aux = self.stage1(b["h_prompt"], b["prompt_feat"], b["h_resp"],
                                  b["len_norm"][..., None], None)
        loss = balanced_ce(logits, b["majority_correct"], cfg.class_balance_power, cfg.class_weight_clip)
        aux_loss = 0.0
        if aux is not None and cfg.aux_weight > 0:
            a = F.cross_entropy(aux.reshape(-1, 2), b["correct"].reshape(-1).long())
            loss = loss + cfg.aux_weight * a
            aux_loss = float(a.detach())
        return loss, aux_loss

    def _stage2_loss(self, b: dict[str, Tensor]) -> Tensor:
        cfg = self.cfg
        out, _ = self.stage2(b["h_prompt"], b["prompt_feat"], b["h_resp"], None, b["minority"])
        if self.regression:
            return F.mse_loss(out[:, 0], b["true_cag"])
        return balanced_ce(out, b["count"], cfg.class_balance_power, cfg.class_weight_clip,
                           admissible=b["admissible"])

    def _buffer_snapshot(self, module: torch.nn.Module, buffers: list[Tensor]) -> list[Tensor]:
        """A copy of ``module``'s buffers (BatchNorm statistics and counts) in tensors kept for it
        between gradient steps, written by one foreach copy: a clone per buffer was ~126 of an
        update's ~1800 dispatched ops (and as many small copies on a GPU)."""
        snap = self._snapshots.get(id(module))
        if snap is None or len(snap) != len(buffers) or any(
                s.shape != b.shape or s.dtype != b.dtype or s.device != b.device
                for s, b in zip(snap, buffers)):
            snap = self._snapshots[id(module)] = [torch.empty_like(b) for b in buffers]
        with torch.no_grad():
            torch._foreach_copy_(snap, buffers)
        return snap

    def _step(self, module, opt, forward) -> tuple[float, float] | None:
        """One AdamW step of ``module`` on the loss of ``forward()`` -> (loss, aux loss value).

        Returns (loss value, aux loss value), or None when the loss or the gradient norm is not
        finite: the step is then skipped and the BatchNorm buffers that the forward moved are put
        back, so one diverged batch cannot turn the classifiers into NaN (the decisions of every
        later step would be silently arbitrary)."""
        buffers = list(module.buffers())
        saved = self._buffer_snapshot(module, buffers)
        loss, aux = forward()
        opt.zero_grad(set_to_none=True)
        ok = bool(torch.isfinite(loss.detach()))
        if ok:
            loss.backward()
            if self.cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.grad_clip)
                ok = bool(torch.isfinite(norm))
        if not ok:
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_copy_(buffers, saved)
            return None
        opt.step()
        return float(loss.detach()), aux

    def train(self, samples: list[Sample]) -> dict[str, float]:
        """One RL step of classifier training on ``samples`` (this step's labels) plus replay.

        Returns metrics (means over the gradient steps taken): ``train/stage1_loss``,
        ``train/stage1_aux_loss``, ``train/stage2_loss``, ``train/samples``, and
        ``train/nonfinite_skipped`` (gradient steps skipped for a non-finite loss or gradient
        norm; absent when none was). A stage whose batch has fewer than 2 samples skips its step
        (BatchNorm needs 2). No samples: no training.
        """
        cfg = self.cfg
        cur1 = list(samples)
        cur2 = [s for s in samples if cfg.stage2_correct_majority == "class0" or not s.majority_correct]
        m = {"train/samples": float(len(cur1))}
        if not cur1:
            return m
        l1, la, l2, n1, n2, skipped = 0.0, 0.0, 0.0, 0, 0, 0
        self.stage1.train()
        self.stage2.train()
        dev, extra = self.cfg.device, max(cfg.replay_batch, 0)
        try:  # the batches too: whatever raises, the classifiers go back to eval mode
            batches1 = _StageBatches(cur1, extra, dev)
            batches2 = _StageBatches(cur2, extra, dev) if cur2 else None
            for _ in range(cfg.train_steps):
                rep1 = self.replay1.sample(cfg.replay_batch, self.gen)
                if len(cur1) + len(rep1) >= 2:
                    r = self._step(self.stage1, self.opt1,
                                   lambda: self._stage1_loss(batches1.batch(rep1)))
                    if r is None:
                        skipped += 1
                    else:
                        l1, la, n1 = l1 + r[0], la + r[1], n1 + 1
                rep2 = self.replay2.sample_stratified(cfg.replay_batch, self.gen)
                if len(cur2) + len(rep2) >= 2 and cur2:
                    r = self._step(self.stage2, self.opt2,
                                   lambda: (self._stage2_loss(batches2.batch(rep2)), 0.0))
                    if r is None:
                        skipped += 1
                    else:
                        l2, n2 = l2 + r[0], n2 + 1
        finally:
            self.stage1.eval()
            self.stage2.eval()
        self.replay1.extend(cur1)
        self.replay2.extend(cur2)
        self.updates += 1
        self._drop_decide_cache()
        if n1:
            m["train/stage1_loss"], m["train/stage1_aux_loss"] = l1 / n1, la / n1
        if n2:
            m["train/stage2_loss"] = l2 / n2
        if skipped:
            m["train/nonfinite_skipped"] = float(skipped)
        return m

    # ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Modules, optimisers, both replay buffers (samples stored once) and the replay RNG."""
        pool: list[Sample] = []
        index: dict[int, int] = {}
        for s in list(self.replay1.items) + list(self.replay2.items):
            if id(s) not in index:
                index[id(s)] = len(pool)
                pool.append(s)
        return {
            "hidden_size": self.hidden_size, "regression": self.regression,
            "stage1": self.stage1.state_dict(), "stage2": self.stage2.state_dict(),
            "opt1": self.opt1.state_dict(), "opt2": self.opt2.state_dict(),
            "samples": [s.to_dict() for s in pool],
            "replay1": [index[id(s)] for s in self.replay1.items],
            "replay2": [index[id(s)] for s in self.replay2.items],
            "gen": self.gen.get_state(), "updates": self.updates,
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd["hidden_size"] != self.hidden_size or sd["regression"] != self.regression:
            raise ValueError(f"checkpoint classifiers have H={sd['hidden_size']}, regression="
                             f"{sd['regression']}; this run has H={self.hidden_size}, "
                             f"regression={self.regression}")
        self.stage1.load_state_dict(sd["stage1"])
        self.stage2.load_state_dict(sd["stage2"])
        self.opt1.load_state_dict(sd["opt1"])
        self.opt2.load_state_dict(sd["opt2"])
        pool = [Sample(**d) for d in sd["samples"]]
        self.replay1.items.clear()
        self.replay2.items.clear()
        self.replay1.extend([pool[i] for i in sd["replay1"]])
        self.replay2.extend([pool[i] for i in sd["replay2"]])
        self.gen.set_state(sd["gen"])
        self.updates = sd["updates"]
        self._drop_decide_cache()
