"""Synthetic batches whose right decisions are known, for the core tests.

Each prompt has a gold answer id; its G rollouts' answer ids either put the gold in the majority
(majority correct) or a wrong answer in the majority with the gold in a smaller cluster (or
nowhere). Hidden states encode the truth linearly: the prompt state carries +u when the majority
is right and -u otherwise, each rollout state +v when that rollout is correct and -v otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class World:
    B: int
    G: int
    H: int
    u: torch.Tensor
    v: torch.Tensor


@dataclass
class SynthBatch:
    uids: list
    ids: torch.Tensor
    lengths: torch.Tensor
    h_prompt: torch.Tensor
    h_resp: torch.Tensor
    gold: dict
    majority_correct: torch.Tensor

    def kwargs(self) -> dict:
        return dict(lengths=self.lengths, h_prompt=self.h_prompt, h_resp=self.h_resp)


def make_world(B=32, G=8, H=16, seed=0) -> World:
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(H, generator=g)
    v = torch.randn(H, generator=g)
    return World(B, G, H, 2.0 * u / u.norm(), 2.0 * v / v.norm())


def make_batch(world: World, step: int, seed: int = 0, p_wrong: float = 0.4, prefix: str = "s",
               signal: float = 1.0) -> SynthBatch:
    B, G, H = world.B, world.G, world.H
    g = torch.Generator().manual_seed(seed * 100003 + step)
    ids = torch.empty(B, G, dtype=torch.long)
    mc = torch.rand(B, generator=g) >= p_wrong
    gold = {}
    uids = [f"{prefix}{step}_{i}" for i in range(B)]
    for b in range(B):
        gid = int(torch.randint(0, 50, (1,), generator=g))
        wrong = [gid + 1 + k for k in range(G)]
        row = []
        if mc[b]:
            x = int(torch.randint(G // 2 + 1, G + 1, (1,), generator=g))
            row = [gid] * x
            rest = G - x
            row += [wrong[int(torch.randint(0, 3, (1,), generator=g))] if torch.rand(1, generator=g) < 0.8
                    else -1 for _ in range(rest)]
        else:
            x = int(torch.randint(G // 2, G + 1, (1,), generator=g))
            k = int(torch.randint(0, min(x - 1, G - x) + 1, (1,), generator=g)) if x < G else 0
            row = [wrong[0]] * x + [gid] * k
            row += [-1] * (G - x - k)
        perm = torch.randperm(G, generator=g)
        ids[b] = torch.tensor(row)[perm]
        gold[uids[b]] = gid
    correct = ids == torch.tensor([gold[u] for u in uids])[:, None]
    sgn_p = (mc.float() * 2 - 1)[:, None]
    sgn_r = (correct.float() * 2 - 1)[..., None]
    h_prompt = signal * sgn_p * world.u + torch.randn(B, H, generator=g)
    h_resp = signal * sgn_r * world.v + torch.randn(B, G, H, generator=g)
    lengths = torch.randint(50, 3000, (B, G), generator=g)
    return SynthBatch(uids, ids, lengths, h_prompt, h_resp, gold, mc)
