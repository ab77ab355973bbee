"""The acquisition step replayed from a CUDA graph: a per-shape plan for callers that run the step
often and feel its host cost.

On CUDA the fused step is one op, but its host part (argument checks, ~15 allocations, the
features kernel, two cuBLAS GEMMs, the weight split, the tail kernel) costs more than the device
work at CARE's sizes: on an H200 at B x G x H = 64 x 8 x 4096 a call took 78.5 us host-inclusive
against a 44.7 us graph replay (bench/RESULTS.md, thirteenth session). :class:`StepGraph` captures
the step once per input signature, over static input and weight buffers it owns, and afterwards
runs a call as: copy the inputs into the buffers (:func:`care_ext.ops.copy_into`: one native
call, on CUDA one kernel for all four; skipped for a tensor that already is the buffer,
:meth:`StepGraph.buffers`), copy weights that changed, replay. The captured step is the
same op on the same values, so the outputs are the same bits as :func:`care_ext.ops.acquisition_step`
(CUDA test).

What it costs: the copies (device time: the hidden states are read twice, so at 1024 x 64 x 4096
the copy alone would add ~half the step; :func:`graph_pays` says where a graph is worth it), a
private memory pool per captured signature (static inputs, weights, outputs and the step's
scratch), and outputs that belong to the plan: the next call with the same signature overwrites
them in place (as torch's graphed callables do); clone what you keep.

On other devices (the CPU) a plan is a plain call of :func:`care_ext.ops.acquisition_step`.

The CARE core's decide does not use it: there the step is < 1% of the decide (5.8 ms at
64 x 8 x 4096 on the H200).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor

from . import ops
from .reference import AcquisitionOutputs

GRAPH_MAX_HIDDEN_BYTES = 32 * 2**20
""":func:`graph_pays`' limit on the hidden states' bytes. Measured on an H200 (2026-11-28, split2
step, bench/RESULTS.md, seventeenth session): at 64 x 8 x 4096 (4.2 MB of bf16 hidden states) the
plan took 47.8-48.1 us per call against 82.5-137 eager (host-bound) and a 40.6-40.8 us bare
replay; at 256 x 32 x 4096 (67 MB) 153.5-153.8 against 119.4-121.0 eager; at 1024 x 64 x 4096
(537 MB) 815-817 against 540-542 eager: the copy into the plan's buffers costs ~0.5 us per MB.
From some size on the eager step is device-bound and the copy only adds, so the limit sits
between 4.2 and 67 MB."""


def graph_pays(h_prompt: Tensor, h_resp: Tensor) -> bool:
    """Whether :class:`StepGraph` is expected to beat a plain call for these hidden states: CUDA
    tensors of at most :data:`GRAPH_MAX_HIDDEN_BYTES` bytes together."""
    nbytes = h_prompt.numel() * h_prompt.element_size() + h_resp.numel() * h_resp.element_size()
    return h_resp.is_cuda and nbytes <= GRAPH_MAX_HIDDEN_BYTES


def _input_key(ids: Tensor, lengths: Tensor, h_prompt: Tensor, h_resp: Tensor) -> tuple:
    """The inputs' part of a signature: shapes, dtypes and ids' device (strides do not matter:
    the inputs are copied into contiguous buffers)."""
    return (ids.shape, ids.dtype, ids.device, lengths.shape, lengths.dtype, h_prompt.shape,
            h_prompt.dtype, h_resp.shape, h_resp.dtype)


def _meta(t: Tensor) -> tuple:
    """What a captured weight copy is specific to: shape, strides (the kernels read weights
    through their strides), dtype and device."""
    return (t.shape, t.stride(), t.dtype, t.device)


class _Captured:
    """One signature's graph: static inputs, owned weight copies, the outputs it writes."""

    def __init__(self, inputs: Sequence[Tensor], weights: Sequence[Tensor], n1: int, n2: int,
                 scalars: tuple, warmup: int):
        # contiguous static inputs; weights copied with their strides (the kernels' layout)
        self.inputs = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in inputs]
        self.weights = [torch.empty_strided(w.shape, w.stride(), dtype=w.dtype, device=w.device)
                        for w in weights]
        for dst, src in zip(self.inputs + self.weights, list(inputs) + list(weights)):
            dst.copy_(src)
        # what each weight was copied from: the tensor (weakly: a freed one never matches, even
        # where a new tensor reuses its id) and its version counter then
        self.sources = [(weakref.ref(w), w._version) for w in weights]
        self.n1, self.n2, self.scalars = n1, n2, scalars
        device = inputs[0].device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # cuBLAS handles, kernel attributes: before the capture
            for _ in range(warmup):
                self._run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self._run()

    def _run(self) -> AcquisitionOutputs:
        w = self.weights
        s1, s2, split = w[:self.n1], w[self.n1:self.n1 + self.n2], w[self.n1 + self.n2:]
        return ops.acquisition_step(*self.inputs, s1, s2, *self.scalars,
                                    first_layer_split=split or None)

    def refresh_weights(self, weights: Sequence[Tensor]) -> bool:
        """Copy in the weights that are other tensors, or were written, since they were last
        copied. False (nothing copied) where one of those no longer has its captured copy's
        shape, strides, dtype or device: the graph cannot take it."""
        changed = [i for i, (w, (ref, version)) in enumerate(zip(weights, self.sources))
                   if ref() is not w or w._version != version]
        if not changed:
            return True
        if any(_meta(weights[i]) != _meta(self.weights[i]) for i in changed):
            return False
        for i in changed:
            self.weights[i].copy_(weights[i])
            self.sources[i] = (weakref.ref(weights[i]), weights[i]._version)
        return True


class StepGraph:
    """The acquisition step (:func:`care_ext.ops.acquisition_step`) captured in a CUDA graph per
    input signature and replayed (module docstring).

    Args:
        max_len, cag_eps, cag_unbiased, adv_eps, adv_unbiased: the step's scalars, as
            :func:`care_ext.ops.acquisition_step` takes them (the same defaults).
        max_graphs: signatures kept captured at once (least recently used first out); each holds
            its own static buffers and memory pool.
        warmup: uncaptured runs of the step before each capture (torch's advice: lazy
            initialisation, cuBLAS workspaces and kernel attributes happen outside the graph).

    Call it like :func:`care_ext.ops.acquisition_step` without the scalars:
    ``plan(ids, lengths, h_prompt, h_resp, stage1, stage2, first_layer_split=None)``. On CUDA the
    returned :class:`~care_ext.reference.AcquisitionOutputs` are the graph's own tensors, valid
    until the plan's next call with the same signature; elsewhere a plain call's.

    A signature is the inputs' shapes and dtypes, ids' device and the number of weight tensors.
    The weights (both stages' 10 folded tensors and the optional split pieces) are copied into the
    plan at capture, and again on a call where one is another tensor object or was written in
    place since (torch's version counter; a write through ``.data`` escapes it), so a plan
    follows the classifiers' updates; a weight with another shape, strides or dtype than its
    captured copy captures the signature anew.
    """

    def __init__(self, max_len: float = ops.MAX_LEN, cag_eps: float = ops.CAG_EPS,
                 cag_unbiased: bool = ops.CAG_UNBIASED, adv_eps: float = ops.ADV_EPS,
                 adv_unbiased: bool = ops.ADV_UNBIASED, *, max_graphs: int = 2, warmup: int = 2):
        if max_graphs < 1:
            raise ValueError(f"StepGraph: max_graphs must be >= 1, got {max_graphs}")
        if warmup < 1:
            raise ValueError(f"StepGraph: warmup must be >= 1 (a run before the capture), got "
                             f"{warmup}")
        self.scalars = (float(max_len), float(cag_eps), bool(cag_unbiased), float(adv_eps),
                        bool(adv_unbiased))
        self.max_graphs, self.warmup = max_graphs, warmup
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.captures = 0
        """Graphs captured so far (a new signature, a weight of another layout, or a signature
        evicted and seen again)."""

    def __call__(self, ids: Tensor, lengths: Tensor, h_prompt: Tensor, h_resp: Tensor,
                 stage1: Sequence[Tensor], stage2: Sequence[Tensor],
                 first_layer_split: Sequence[Tensor] | None = None) -> AcquisitionOutputs:
        if not ids.is_cuda:
            return ops.acquisition_step(ids, lengths, h_prompt, h_resp, stage1, stage2,
                                        *self.scalars, first_layer_split=first_layer_split)
        weights = [*stage1, *stage2, *(first_layer_split or ())]
        key = (_input_key(ids, lengths, h_prompt, h_resp), len(stage1), len(stage2), len(weights))
        if ids.device.index != torch.cuda.current_device():
            with torch.cuda.device(ids.device):
                return self._replay(key, (ids, lengths, h_prompt, h_resp), weights, len(stage1),
                                    len(stage2))
        return self._replay(key, (ids, lengths, h_prompt, h_resp), weights, len(stage1),
                            len(stage2))

    def _replay(self, key: tuple, inputs, weights, n1: int, n2: int) -> AcquisitionOutputs:
        cap = self._graphs.get(key)
        if cap is not None and cap.refresh_weights(weights):
            self._graphs.move_to_end(key)
            # one native call (one kernel) for the inputs not already in the buffers
            ops.copy_into(cap.inputs, inputs)
        else:
            cap = self._capture(key, inputs, weights, n1, n2)
        cap.graph.replay()
        return cap.outputs

    def _capture(self, key: tuple, inputs, weights, n1: int, n2: int) -> _Captured:
        devices = {t.device for t in (*inputs, *weights)}
        if len(devices) != 1:
            raise ValueError("StepGraph: every input and weight must be on one CUDA device, got "
                             + ", ".join(sorted(map(str, devices))))
        self._graphs.pop(key, None)
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        cap = _Captured(inputs, weights, n1, n2, self.scalars, self.warmup)
        self._graphs[key] = cap
        self.captures += 1
        return cap

    def buffers(self, ids: Tensor, lengths: Tensor, h_prompt: Tensor, h_resp: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """The static input buffers of the graph captured for inputs like these (same shapes,
        dtypes and device), or None where there is none yet. Write the next step's inputs into
        them and pass them back: the plan then copies nothing."""
        want = _input_key(ids, lengths, h_prompt, h_resp)
        for key, cap in reversed(self._graphs.items()):
            if key[0] == want:
                return tuple(cap.inputs)
        return None

    def clear(self) -> None:
        """Drop every captured graph and its buffers."""
        self._graphs.clear()
