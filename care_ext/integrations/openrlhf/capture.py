"""Hidden states from the policy's experience forward, without an extra forward pass.

OpenRLHF's ``PolicyModelActor.forward`` (the "old log-prob" forward of ``make_experience``) runs
the full policy on every rollout once per step anyway. A forward pre-hook on the output embedding
(``lm_head``) sees its input - the final-norm hidden states of every position - and this module
keeps two rows per sample of it:

* the **last prompt token** (the position whose logits predict the first response token), and
* the **last response token** (the last generated token, usually EOS).

Positions come from OpenRLHF's ``action_mask`` [B, A] (``A = T - 1`` in 0.11.2): ``action_mask[j]``
marks token ``off + j + 1`` of ``sequences`` [B, T] as generated, ``off = T - 1 - A``. So the last
prompt token is at ``off + first_j`` and the last response token at ``off + last_j + 1``. A row
without any generated token uses its last attended token for both.

Layouts: padded (hidden [B, T, H], right padding) and packed (``--ds.packing_samples``: hidden
[1, nnz, H] holding the attended tokens of every row in row-major order, as ``unpad_input`` lays
them out). Ring attention (``--ds.ring_attn_size > 1``, packed only) pads the packed sequence to a
multiple of the ring size and gives rank r the r-th equal slice: each rank picks the feature rows
that fall in its slice and one sum all-reduce over the ring group completes them on every rank
(exactly one rank contributes each row, the others add zeros: exact in any dtype).

Nothing here imports OpenRLHF: it operates on torch tensors and ``nn.Module``s.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

_DTYPES = {"native": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def feature_positions(action_mask: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sequence positions of the last prompt token and the last response token.

    Args:
        action_mask: bool/int [B, A], 1 where token ``off + j + 1`` was generated
            (``off = T - 1 - A``).
        attention_mask: int/bool [B, T], 1 on real tokens (right padding).

    Returns:
        ``(p_prompt, p_resp)``: int64 [B] each, positions in ``0..T-1`` of ``sequences``.
    """
    B, A = action_mask.shape
    T = attention_mask.shape[1]
    if A > T - 1:
        raise ValueError(f"action_mask has {A} columns for sequences of length {T}")
    off = T - 1 - A
    am = action_mask.to(torch.bool)
    has = am.any(dim=1)
    col = torch.arange(A, device=am.device).expand(B, A)
    first = torch.where(am, col, torch.full_like(col, A)).min(dim=1).values
    last = torch.where(am, col, torch.full_like(col, -1)).max(dim=1).values
    last_real = attention_mask.to(torch.long).sum(dim=1) - 1  # right padding: last attended token
    p_prompt = torch.where(has, off + first, last_real.to(am.device))
    p_resp = torch.where(has, off + last + 1, last_real.to(am.device))
    return p_prompt.long(), p_resp.long()


def packed_index(attention_mask: Tensor, rows: Tensor, positions: Tensor) -> Tensor:
    """Index into the packed token axis of (row, position) pairs.

    The packed layout keeps the tokens with ``attention_mask == 1`` in row-major order, so the
    packed index of (b, p) is the number of attended tokens before it. Returns int64 [N].
    """
    T = attention_mask.shape[1]
    flat = attention_mask.reshape(-1).to(torch.long)
    before = torch.cumsum(flat, 0) - flat
    return before[rows.long() * T + positions.long()]


def gather_features(hidden: Tensor, action_mask: Tensor, attention_mask: Tensor,
                    packed: bool, ring_group=None) -> tuple[Tensor, Tensor]:
    """Pick the two feature rows of every sample out of the lm_head input.

    Args:
        hidden: [B, T, H] (padded), [1, nnz, H] (packed) or, with ``ring_group``, this rank's
            [1, ceil(nnz / R), H] slice of the packed sequence padded to a multiple of the ring size R.
        action_mask: [B, A]; attention_mask: [B, T] (see :func:`feature_positions`).
        packed: whether ``hidden`` is in the packed layout.
        ring_group: the ring-attention process group (``torch.distributed``), or None. A collective:
            every rank of the group must call it with its own slice.

    Returns:
        ``(h_prompt, h_resp)``: [B, H] each, same dtype and device as ``hidden`` (with a ring
        group: identical on every rank of it).
    """
    attention_mask = attention_mask.to(hidden.device)
    p_prompt, p_resp = feature_positions(action_mask.to(hidden.device), attention_mask)
    B = attention_mask.shape[0]
    rows = torch.arange(B, device=hidden.device)
    if ring_group is not None and not packed:
        raise ValueError("ring attention runs on the packed layout only (--ds.packing_samples)")
    if packed:
        nnz = int(attention_mask.to(torch.long).sum())
        idx = torch.cat([packed_index(attention_mask, rows, p_prompt), packed_index(attention_mask, rows, p_resp)])
        if ring_group is not None:
            return _gather_ring(hidden, idx, nnz, ring_group)
        if hidden.shape[0] != 1 or hidden.shape[1] != nnz:
            raise ValueError(f"packed hidden states must be [1, {nnz}, H], got {tuple(hidden.shape)} "
                             "(a ring-attention slice needs ring_group)")
        out = hidden[0, idx]
        return out[:B], out[B:]
    if hidden.shape[:2] != attention_mask.shape:
        raise ValueError(f"padded hidden states must be [B, T, H] = {tuple(attention_mask.shape)} + [H], "
                         f"got {tuple(hidden.shape)}")
    return hidden[rows, p_prompt], hidden[rows, p_resp]


def _gather_ring(hidden: Tensor, idx: Tensor, nnz: int, group) -> tuple[Tensor, Tensor]:
    """Rows ``idx`` (packed indices, [2B]) of a packed sequence sliced over a ring group."""
    import torch.distributed as dist

    size, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
    local = -(-nnz // size)  # OpenRLHF pads nnz up to a multiple of the ring size, then slices evenly
    if hidden.shape[0] != 1 or hidden.shape[1] != local:
        raise ValueError(f"ring rank {rank}/{size}: packed slice must be [1, {local}, H] for {nnz} tokens, "
                         f"got {tuple(hidden.shape)}")
    mine = (idx // local) == rank
    out = hidden.new_zeros(idx.shape[0], hidden.shape[2])
    out[mine] = hidden[0, idx[mine] - rank * local]
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    B = idx.shape[0] // 2
    return out[:B], out[B:]


def output_embeddings(model: nn.Module) -> nn.Module:
    """The lm_head of an HF causal LM, also inside a DeepSpeed engine (``.module``) or PEFT wrapper."""
    m = model
    for _ in range(4):
        get = getattr(m, "get_output_embeddings", None)
        if callable(get):
            head = get()
            if head is not None:
                return head
        if not hasattr(m, "module"):
            break
        m = m.module
    raise ValueError(f"{type(model).__name__} exposes no output embedding (get_output_embeddings)")


class LmHeadCapture:
    """Context manager: records the input of ``head`` for the forward calls made inside it.

    ``value`` is the input tensor of the last call (the caller's one forward), detached.
    """

    def __init__(self, head: nn.Module) -> None:
        self.head, self.value, self.calls, self._handle = head, None, 0, None

    def _hook(self, module, args, kwargs=None):
        x = args[0] if args else next(iter((kwargs or {}).values()))
        self.value = x.detach()
        self.calls += 1

    def __enter__(self) -> "LmHeadCapture":
        self._handle = self.head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


@dataclass
class CapturedFeatures:
    """Features of one micro-batch forward, shipped from a policy worker to the trainer.

    Attributes:
        h_prompt: [B, H] final-norm hidden state at the last prompt token (CPU); with
            ``--care.worker_reduce first_layer`` its projection, float32 [B, P1 + P2].
        h_resp: [B, H] at the last response token (CPU); projected: float32 [B, R1a + R1b].
        checksum: int64 [B], sum of each row's attended token ids: the trainer checks it against
            its own sequences, so a misaligned hand-over fails loudly instead of mixing samples.
        version: None for raw states, else the :class:`care_ext.projection.FirstLayerProjection`
            version that projected them.
        raw: projected only, on the worker: the raw ``(h_prompt, h_resp)`` [B, H] each (CPU), which
            the worker keeps and takes off before shipping (``care_fetch_raw`` serves them).
    """

    h_prompt: Tensor
    h_resp: Tensor
    checksum: Tensor
    version: int | None = None
    raw: tuple | None = None


def sequence_checksum(sequences: Tensor, attention_mask: Tensor) -> Tensor:
    """int64 [B]: sum of the token ids of each row's attended positions."""
    return (sequences.to(torch.long) * attention_mask.to(torch.long)).sum(dim=1).cpu()


def capture_forward(actor: nn.Module, run, sequences: Tensor, action_mask: Tensor,
                    attention_mask: Tensor, feature_dtype: str = "native", ring_group=None,
                    projection=None):
    """Run ``run()`` (one policy forward over ``sequences``) while capturing features.

    Args:
        actor: OpenRLHF ``Actor`` (its ``.model`` is the HF model or DeepSpeed engine; its
            ``packing_samples`` selects the layout).
        run: zero-argument callable performing the forward; its result is returned unchanged.
        sequences, action_mask, attention_mask: the batch given to the forward ([B, T], [B, A], [B, T]).
        feature_dtype: 'native', 'float32' or 'bfloat16' (the cast runs before the device copy).
        ring_group: the worker's ring-attention group (``strategy.ring_attn_group``) or None.
        projection: a :class:`care_ext.projection.FirstLayerProjection` (on the hidden states'
            device) or None: project the two rows on the device before the copy to the CPU; the
            raw rows (cast to ``feature_dtype``) ride along in ``CapturedFeatures.raw``.

    Returns:
        ``(run's result, CapturedFeatures)``.
    """
    if feature_dtype not in _DTYPES:
        raise ValueError(f"feature_dtype must be one of {tuple(_DTYPES)}, got {feature_dtype!r}")
    with LmHeadCapture(output_embeddings(actor.model)) as cap:
        out = run()
    if cap.value is None:
        raise RuntimeError("the lm_head pre-hook did not fire during the policy forward")
    hp, hr = gather_features(cap.value, action_mask, attention_mask,
                             packed=bool(getattr(actor, "packing_samples", False)), ring_group=ring_group)
    dt = _DTYPES[feature_dtype]
    if dt is not None:
        hp, hr = hp.to(dt), hr.to(dt)
    checksum = sequence_checksum(sequences, attention_mask)
    if projection is None:
        return out, CapturedFeatures(hp.cpu(), hr.cpu(), checksum)
    pp, pr = projection.apply(hp, hr)
    return out, CapturedFeatures(pp.cpu(), pr.cpu(), checksum, projection.version, (hp.cpu(), hr.cpu()))
