"""Sampling G rollouts per prompt, and the one scoring forward GRPO runs over prompt + response.

The scoring forward (the "old log-prob" pass of GRPO) yields, at no extra cost, everything CARE
needs from the policy: per-token log-probs and entropies of each response, the response lengths,
and the final-norm hidden states at the last prompt token ('=') and at the last response token
(the end mark, or the last sampled token when a response never ends).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import TinyGPT
from .task import END, PAD


@torch.no_grad()
def sample_responses(model: TinyGPT, prompts: Tensor, max_new_tokens: int, temperature: float,
                     gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Autoregressive sampling (temperature 0 = greedy).

    Args:
        model: the policy.
        prompts: int64 [N, Tp], all prompts of equal length (no padding).
        max_new_tokens: tokens generated per row (9 for the default task: 8 + one spare).
        temperature: softmax temperature; 0 selects the argmax token.
        gen: random generator for sampling (unused when greedy).

    Returns:
        responses: int64 [N, max_new_tokens]; every token after the first end mark is PAD.
        lengths: int64 [N], tokens up to and including the first end mark (max_new_tokens when
            the row never emits it).
    """
    out = []
    logits, _, cache = model.forward_cached(prompts, None)
    for i in range(max_new_tokens):
        last = logits[:, -1].float()
        if temperature == 0:
            nxt = last.argmax(dim=-1)
        else:
            probs = torch.softmax(last / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        out.append(nxt)
        if i + 1 < max_new_tokens:
            logits, _, cache = model.forward_cached(nxt[:, None], cache)
    return finalize_responses(torch.stack(out, dim=1))


def finalize_responses(responses: Tensor) -> tuple[Tensor, Tensor]:
    """Cut raw sampled rows at their first end mark.

    Args:
        responses: int64 [N, T] raw tokens.

    Returns:
        (responses with PAD after the first end mark, lengths int64 [N] as in
        :func:`sample_responses`).
    """
    n, t = responses.shape
    is_end = responses == END
    has_end = is_end.any(dim=1)
    first_end = torch.where(has_end, is_end.float().argmax(dim=1), torch.full((n,), t - 1))
    lengths = first_end + 1
    keep = torch.arange(t)[None, :] < lengths[:, None]
    return torch.where(keep, responses, torch.full_like(responses, PAD)), lengths


def response_mask(lengths: Tensor, width: int) -> Tensor:
    """bool [N, width]: True on the first lengths[i] tokens of row i."""
    return torch.arange(width)[None, :] < lengths[:, None]


def score_responses(model: TinyGPT, prompts: Tensor, responses: Tensor, lengths: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One forward over prompt + response (differentiable when grad is enabled).

    Args:
        prompts: int64 [N, Tp] (one row per rollout).
        responses: int64 [N, Tr]; lengths: int64 [N].

    Returns:
        logprobs: float32 [N, Tr], log p(response token j | prefix); 0 beyond lengths.
        entropies: float32 [N, Tr], entropy of the next-token distribution at each response
            position; 0 beyond lengths.
        h_prompt: float32 [N, H], final-norm hidden state at the last prompt token.
        h_last: float32 [N, H], final-norm hidden state at the last response token
            (position Tp - 1 + lengths).
    """
    tp, tr = prompts.shape[1], responses.shape[1]
    logits, hidden = model(torch.cat([prompts, responses], dim=1))
    logp_all = F.log_softmax(logits[:, tp - 1:tp - 1 + tr].float(), dim=-1)
    mask = response_mask(lengths, tr)
    logprobs = logp_all.gather(-1, responses[..., None]).squeeze(-1) * mask
    entropies = -(logp_all.exp() * logp_all).sum(-1) * mask
    rows = torch.arange(prompts.shape[0])
    return logprobs, entropies, hidden[:, tp - 1], hidden[rows, tp - 1 + lengths]


@dataclass
class Rollouts:
    """B prompts x G rollouts and what the scoring forward produced (rows are prompt-major:
    rollout g of prompt b is row b * G + g).

    Attributes:
        prompts: int64 [B, Tp].
        responses: int64 [B*G, Tr], PAD after the end mark.
        lengths: int64 [B*G], response tokens including the end mark.
        old_logprobs: float32 [B*G, Tr], log-probs under the sampling policy (0 beyond lengths).
        entropies: float32 [B*G, Tr] (0 beyond lengths).
        h_prompt: float32 [B, H], hidden state at the last prompt token.
        h_resp: float32 [B, G, H], hidden state at each rollout's last response token.
        group_size: G.
    """

    prompts: Tensor
    responses: Tensor
    lengths: Tensor
    old_logprobs: Tensor
    entropies: Tensor
    h_prompt: Tensor
    h_resp: Tensor
    group_size: int

    @property
    def mask(self) -> Tensor:
        """bool [B*G, Tr]: the response tokens that count (up to and including the end mark)."""
        return response_mask(self.lengths, self.responses.shape[1])

    @property
    def rollout_prompts(self) -> Tensor:
        """int64 [B*G, Tp]: each prompt repeated G times."""
        return self.prompts.repeat_interleave(self.group_size, dim=0)

    def mean_token_prob(self) -> Tensor:
        """float32 [B, G]: mean over response tokens of exp(log-prob) (the Prob baseline's input)."""
        m = self.mask.float()
        per = (self.old_logprobs.exp() * m).sum(1) / m.sum(1).clamp(min=1)
        return per.view(-1, self.group_size)


@torch.no_grad()
def sample_rollouts(model: TinyGPT, prompts: Tensor, group_size: int, max_new_tokens: int,
                    temperature: float, gen: torch.Generator) -> Rollouts:
    """Sample G rollouts for each of B prompts, then run the scoring forward once.

    Args:
        prompts: int64 [B, Tp]; group_size: G; max_new_tokens, temperature, gen: as in
            :func:`sample_responses`.
    """
    rep = prompts.repeat_interleave(group_size, dim=0)
    responses, lengths = sample_responses(model, rep, max_new_tokens, temperature, gen)
    logprobs, entropies, h_p, h_last = score_responses(model, rep, responses, lengths)
    b = prompts.shape[0]
    return Rollouts(prompts, responses, lengths, logprobs, entropies,
                    h_p.view(b, group_size, -1)[:, 0].contiguous(),
                    h_last.view(b, group_size, -1), group_size)
