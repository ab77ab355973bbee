"""Test stand-in: the padding helpers OpenRLHF's ring_attn_utils imports, in plain torch.

Semantics follow the helpers' documented behaviour: ``unpad_input(x [B, T, ...], mask [B, T])``
keeps the positions where ``mask`` is 1 in row-major order and returns ``(x_unpadded [nnz, ...],
indices [nnz], cu_seqlens int32 [B+1], max_seqlen, seqused [B])``.
"""
import torch
import torch.nn.functional as F
from einops import rearrange  # noqa: F401  (re-exported, as the real module does)


def index_first_axis(x, indices):
    return x[indices]


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return flat[indices], indices, cu_seqlens, int(seqlens.max().item()), seqlens


def pad_input(hidden_states, indices, batch, seqlen):
    out = torch.zeros(batch * seqlen, *hidden_states.shape[1:], dtype=hidden_states.dtype,
                      device=hidden_states.device)
    out[indices] = hidden_states
    return out.reshape(batch, seqlen, *hidden_states.shape[1:])
