"""GRPO policy update: PPO-style clipped ratio, token-mean loss, no KL, per-prompt weights.

What goes in is decided elsewhere (the CARE core): per-rollout advantages already scaled by each
prompt's weight, and which prompts stay in the batch. Dropped prompts are removed before the
minibatches are formed, so they cost no backward pass and do not dilute the token mean.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .model import TinyGPT
from .rollout import Rollouts, score_responses


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO hyper-parameters (tiny_lab.md §1 defaults).

    Attributes:
        steps: RL steps per run.
        prompts_per_step: B, fresh prompts per step.
        group_size: G, rollouts per prompt.
        temperature: sampling temperature of the rollouts.
        max_new_tokens: tokens sampled per rollout (one more than a well-formed response).
        clip: PPO ratio clip epsilon (ratio clipped to [1 - clip, 1 + clip]).
        minibatches: gradient steps per RL step; the kept rollouts are shuffled and split into
            this many near-equal minibatches (fewer if fewer rollouts are kept).
        lr, betas, weight_decay: AdamW settings.
        grad_clip: max global gradient norm.
        adv_eps, adv_unbiased: group advantage convention (A = (r - mean) / (std + eps),
            population std when unbiased is False).
    """

    steps: int = 200
    prompts_per_step: int = 32
    group_size: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 9
    clip: float = 0.2
    minibatches: int = 2
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    adv_eps: float = 1e-6
    adv_unbiased: bool = False

    def to_dict(self) -> dict:
        """Plain dict (for logs and config hashes)."""
        return asdict(self)


def make_optimizer(model: TinyGPT, cfg: GRPOConfig) -> torch.optim.Optimizer:
    """AdamW over all policy parameters with the config's lr, betas and weight decay."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas,
                             weight_decay=cfg.weight_decay)


def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                        clip: float) -> tuple[Tensor, dict]:
    """PPO clipped surrogate, averaged over the masked tokens of the whole minibatch.

    Args:
        logprobs: float [N, T] under the current policy (differentiable).
        old_logprobs: float [N, T] under the sampling policy.
        advantages: float [N], one advantage per rollout (already weighted).
        mask: bool [N, T], tokens that count.
        clip: ratio clip epsilon.

    Returns:
        loss: scalar, -sum(min(ratio * A, clip(ratio) * A) * mask) / sum(mask) (0 when the mask is
            empty).
        stats: {"clip_frac": fraction of masked tokens whose ratio lies outside the clip range and
            whose clipped term is the active minimum, "ratio_mean": mean ratio over masked tokens}.
    """
    m = mask.to(logprobs.dtype)
    denom = m.sum().clamp(min=1.0)
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages[:, None].to(logprobs.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * adv
    obj = torch.minimum(unclipped, clipped)
    loss = -(obj * m).sum() / denom
    with torch.no_grad():
        active = (clipped < unclipped) & mask
        stats = {"clip_frac": float(active.sum()) / float(denom),
                 "ratio_mean": float((ratio * m).sum() / denom)}
    return loss, stats


def grpo_update(model: TinyGPT, optimizer: torch.optim.Optimizer, rollouts: Rollouts,
                advantages: Tensor, keep: Tensor, cfg: GRPOConfig,
                gen: torch.Generator) -> dict:
    """One RL step of policy updates.

    Args:
        rollouts: the step's B x G rollouts (with old log-probs from the scoring forward).
        advantages: float [B, G], per-rollout advantages already multiplied by the prompt weights.
        keep: bool [B]; prompts with False are removed from the batch (no forward/backward).
        cfg: minibatches, clip, grad_clip are read.
        gen: generator for the minibatch shuffle.

    Returns:
        {"loss": mean minibatch loss, "clip_frac", "updates": gradient steps taken,
         "kept_rollouts": rollouts trained on}. No step is taken when nothing is kept.
    """
    g = rollouts.group_size
    rows = torch.nonzero(keep.repeat_interleave(g), as_tuple=False).squeeze(1)
    out = {"loss": 0.0, "clip_frac": 0.0, "updates": 0, "kept_rollouts": int(rows.numel())}
    if rows.numel() == 0:
        return out
    rows = rows[torch.randperm(rows.numel(), generator=gen)]
    adv_flat = advantages.reshape(-1)
    prompts_all = rollouts.rollout_prompts
    mask_all = rollouts.mask
    losses, clips = [], []
    for chunk in torch.tensor_split(rows, min(cfg.minibatches, rows.numel())):
        logp, _, _, _ = score_responses(model, prompts_all[chunk], rollouts.responses[chunk],
                                        rollouts.lengths[chunk])
        loss, st = clipped_policy_loss(logp, rollouts.old_logprobs[chunk], adv_flat[chunk],
                                       mask_all[chunk], cfg.clip)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        clips.append(st["clip_frac"])
    out.update(loss=sum(losses) / len(losses), clip_frac=sum(clips) / len(clips),
               updates=len(losses))
    return out
