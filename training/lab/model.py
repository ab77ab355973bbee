"""A tiny character-level GPT (pre-LayerNorm decoder) that exposes its final-norm hidden states.

Default size (tiny_lab.md §1): 2 layers, d_model 128, 4 heads, MLP 512, learned positions, context
32, untied output head without bias: 405,760 parameters for the 19-token vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .task import VOCAB


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the tiny GPT.

    Attributes:
        vocab_size: number of tokens (19 for the arithmetic task).
        max_len: context length (learned positional embeddings); prompt 9 + response 9 fit in 32.
        d_model: residual width; also the hidden size H the CARE classifiers see.
        n_layers: decoder blocks.
        n_heads: attention heads (d_model must be divisible by it).
        d_mlp: width of the MLP hidden layer (GELU).
    """

    vocab_size: int = len(VOCAB)
    max_len: int = 32
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 512

    def to_dict(self) -> dict:
        """Plain dict (for checkpoints and config hashes)."""
        return asdict(self)


class Block(nn.Module):
    """Pre-LN decoder block: x + attn(ln1(x)), then x + mlp(ln2(x)), causal attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.fc2 = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x: float [N, T, D] -> (float [N, T, D], (keys, values) [N, heads, T_total, D/heads]).

        With ``cache`` (keys/values of the earlier positions), x holds the next positions only.
        """
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        if t == 1:  # one new position attends to everything before it
            att = F.scaled_dot_product_attention(q, k, v)
        elif cache is None:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            raise ValueError("a cached forward takes one new position at a time")
        x = x + self.proj(att.transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)))), (k, v)


class TinyGPT(nn.Module):
    """Decoder-only LM. ``forward`` returns logits and the final-LayerNorm output (the hidden states
    the CARE classifiers read, as the lm_head input of a Hugging Face model would be)."""

    def __init__(self, cfg: ModelConfig = ModelConfig()):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for blk in self.blocks:  # scaled init of the residual projections (GPT-2 style)
            for lin in (blk.proj, blk.fc2):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(mod: nn.Module) -> None:
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            nn.init.normal_(mod.weight, std=0.02)
        if isinstance(mod, nn.Linear) and mod.bias is not None:
            nn.init.zeros_(mod.bias)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Causal forward.

        Args:
            tokens: int64 [N, T], T <= max_len. Padding may only follow the tokens that matter
                (causal attention never looks right, so trailing pads change nothing before them).

        Returns:
            logits: float32 [N, T, V]; logits[:, t] predict token t + 1.
            hidden: float32 [N, T, D], the output of the final LayerNorm (input of the head).
        """
        logits, hidden, _ = self.forward_cached(tokens, None)
        return logits, hidden

    def forward_cached(self, tokens: Tensor, cache: list | None
                       ) -> tuple[Tensor, Tensor, list]:
        """Forward with a key/value cache (used by sampling).

        Args:
            tokens: int64 [N, T]: the whole prefix when ``cache`` is None, else one new position.
            cache: what the previous call returned, or None.

        Returns:
            (logits [N, T, V], hidden [N, T, D], new cache covering every position so far).
        """
        start = 0 if cache is None else cache[0][0].shape[2]
        t = tokens.shape[1]
        if start + t > self.cfg.max_len:
            raise ValueError(f"sequence length {start + t} exceeds max_len {self.cfg.max_len}")
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(start, start + t, device=tokens.device))
        new_cache = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, None if cache is None else cache[i])
            new_cache.append(kv)
        hidden = self.ln_f(x)
        return self.head(hidden), hidden, new_cache

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())
