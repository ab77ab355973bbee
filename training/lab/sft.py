"""Supervised training of the tiny GPT on noisy traces, cached on disk by a hash of its config.

The checkpoint is trained to convergence on the noisy distribution (no early stopping): the
diversity of the 8 GRPO samples then comes from the noise itself (tiny_lab.md §1).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .model import ModelConfig, TinyGPT
from .task import TaskConfig, sft_batch

SFT_FORMAT_VERSION = 1
"""Bumped when the SFT code changes in a way that invalidates cached checkpoints."""


@dataclass(frozen=True)
class SFTConfig:
    """SFT recipe (tiny_lab.md §1 defaults).

    Attributes:
        steps: optimiser steps (fresh noisy samples every step).
        batch_size: sequences per step.
        lr: peak learning rate (linear warm-up, then cosine decay to 0).
        warmup_steps: linear warm-up length.
        weight_decay: AdamW weight decay.
        seed: seed of the initialisation and of the data stream.
        task: the task and its noise model.
        model: the network shape.
    """

    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def to_dict(self) -> dict:
        """Nested plain dict."""
        return asdict(self)

    def key(self) -> str:
        """16-hex-digit hash of the config and the SFT format version (the cache key)."""
        blob = json.dumps({"v": SFT_FORMAT_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lr_at(step: int, cfg: SFTConfig) -> float:
    """Learning rate at 0-based ``step``: linear warm-up to cfg.lr, then cosine to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_sft(cfg: SFTConfig, progress: Callable[[int, float], None] | None = None) -> tuple[TinyGPT, dict]:
    """Train a fresh model on the noisy SFT stream.

    Args:
        cfg: the recipe.
        progress: optional callback(step, loss) after every step.

    Returns:
        (model in eval mode, info dict with final_loss (mean of the last 50 steps) and seconds).
    """
    torch.manual_seed(cfg.seed)
    model = TinyGPT(cfg.model)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    t0, recent = time.time(), []
    model.train()
    for step in range(cfg.steps):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, cfg)
        tokens, loss_mask = sft_batch(cfg.batch_size, cfg.task, gen)
        logits, _ = model(tokens[:, :-1])
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                              reduction="none").view(loss_mask.shape)
        loss = (nll * loss_mask).sum() / loss_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if progress is not None:
            progress(step, recent[-1])
    model.eval()
    return model, {"final_loss": sum(recent) / max(1, len(recent)), "seconds": time.time() - t0}


def default_cache_dir() -> Path:
    """$CARE_LAB_CACHE, else ~/.cache/care_ext/lab."""
    env = os.environ.get("CARE_LAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "care_ext" / "lab"


def checkpoint_path(cfg: SFTConfig, cache_dir: Path | str | None = None) -> Path:
    """Where the checkpoint of ``cfg`` lives: <cache_dir>/sft-<key>.pt."""
    return Path(cache_dir or default_cache_dir()) / f"sft-{cfg.key()}.pt"


def load_checkpoint(path: Path | str) -> TinyGPT:
    """Load a model saved by :func:`load_or_train_sft` (eval mode, CPU)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = TinyGPT(ModelConfig(**blob["model_config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def load_or_train_sft(cfg: SFTConfig, cache_dir: Path | str | None = None,
                      progress: Callable[[int, float], None] | None = None,
                      log: Callable[[str], None] = print) -> tuple[Path, dict]:
    """Return the cached checkpoint of ``cfg``, training and saving it first if it is missing.

    The file is written to a temporary name and renamed, so a crash never leaves a partial
    checkpoint under the final name.

    Returns:
        (checkpoint path, info dict: cached (bool), final_loss, seconds, key).
    """
    path = checkpoint_path(cfg, cache_dir)
    if path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return path, {**blob["info"], "cached": True, "key": cfg.key()}
    log(f"[lab] training the SFT checkpoint ({cfg.steps} steps) -> {path}")
    model, info = train_sft(cfg, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": model.state_dict(), "model_config": cfg.model.to_dict(),
                "sft_config": json.dumps(cfg.to_dict()), "info": info}, tmp)
    os.replace(tmp, path)
    return path, {**info, "cached": False, "key": cfg.key()}
