"""Input generators and comparison helpers for the op tests (native vs reference)."""
from __future__ import annotations

import torch

from care_ext import reference as R

G_GRID = [1, 2, 5, 8, 16, 64]
B_GRID = [0, 1, 7, 64, 1000]


def random_ids(B: int, G: int, gen: torch.Generator, p_invalid: float = 0.2,
               device: str = "cpu") -> torch.Tensor:
    """int64 [B, G] answer ids with a random number of distinct answers per row, sparse large
    labels, and about p_invalid of them -1."""
    n = torch.randint(1, G + 1, (B, 1), generator=gen)
    ids = (torch.rand(B, G, generator=gen) * n).long() * 7919 + 11
    ids[torch.rand(B, G, generator=gen) < p_invalid] = -1
    return ids.to(device)


def random_rewards(B: int, G: int, gen: torch.Generator, device: str = "cpu") -> torch.Tensor:
    """float32 [B, G] rewards: a mix of 0/1 rows (some constant) and real-valued rows."""
    binary = (torch.rand(B, G, generator=gen) < torch.rand(B, 1, generator=gen)).float()
    real = torch.randn(B, G, generator=gen)
    use_real = torch.rand(B, 1, generator=gen) < 0.3
    return torch.where(use_real, real, binary).to(device)


def assert_exact(native: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Integer/bool outputs must match exactly; print the first mismatching rows on failure."""
    assert native.dtype == ref.dtype, f"{what}: dtype {native.dtype} != {ref.dtype}"
    assert native.shape == ref.shape, f"{what}: shape {tuple(native.shape)} != {tuple(ref.shape)}"
    native, ref = native.cpu(), ref.cpu()
    if not torch.equal(native, ref):
        bad = (native != ref).reshape(native.shape[0], -1).any(1).nonzero().flatten()[:3]
        raise AssertionError(f"{what}: {len(bad)}+ rows differ, e.g. rows {bad.tolist()}:\n"
                             f"native={native[bad]}\nref={ref[bad]}")


def assert_close(native: torch.Tensor, ref64: torch.Tensor, what: str, rtol: float = 1e-5,
                 atol: float = 1e-6) -> None:
    """Float outputs against a float64 reference, to float32 tolerance."""
    assert native.shape == ref64.shape, f"{what}: shape {tuple(native.shape)} != {tuple(ref64.shape)}"
    torch.testing.assert_close(native.cpu().double(), ref64.cpu().double(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def random_weights(H: int, Fp: int, Fr: int, C: int, gen: torch.Generator, P: int = 128,
                   R1: int = 64, R2: int = 512, K: int = 256, device: str = "cpu"
                   ) -> list[torch.Tensor]:
    """10 folded float32 classifier weights (CLASSIFIER_WEIGHT_NAMES order), scaled so activations
    stay O(1) and the ReLUs are mixed on and off."""
    shapes = [(P, H + Fp), (P,), (R1, H + Fr), (R1,), (R2, R1), (R2,), (K, P + R2), (K,), (C, K),
              (C,)]
    out = []
    for s in shapes:
        fan_in = s[1] if len(s) == 2 else 1
        out.append((torch.randn(*s, generator=gen) / fan_in ** 0.5).to(device))
    return out


def to64(ts):
    return [t.double() for t in ts]


__all__ = ["R", "G_GRID", "B_GRID", "random_ids", "random_rewards", "assert_exact", "assert_close",
           "random_weights", "to64", "assert_like_torch", "step_inputs", "run_step",
           "assert_step_like_reference"]


def assert_like_torch(got: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor, what: str) -> None:
    """Native error vs float64 at most 2x torch's own float32 error + 1e-5 (flash-attn's rule)."""
    assert got.shape == ref64.shape and got.dtype == torch.float32
    err = (got.cpu().double() - ref64).abs().max().item() if got.numel() else 0.0
    base = (ref32.double() - ref64).abs().max().item() if got.numel() else 0.0
    assert err <= 2 * base + 1e-5, f"{what}: max error {err:.3g} vs torch fp32 {base:.3g}"


def step_inputs(B: int, G: int, H: int, dtype: torch.dtype, gen: torch.Generator, **dims):
    """Inputs of one acquisition step: ids, lengths, h_prompt and h_resp in ``dtype``, and the
    Stage-I / Stage-II folded weights (CARE-sized, or the layer sizes ``dims``: P, R1, R2, K of
    :func:`random_weights`), all on the CPU."""
    ids = random_ids(B, G, gen)
    lengths = torch.randint(1, 5000, (B, G), generator=gen)
    h_p = torch.randn(B, H, generator=gen).to(dtype)
    h_r = torch.randn(B, G, H, generator=gen).to(dtype)
    s1 = random_weights(H, G + 1, 1, 2, gen, **dims)
    s2 = random_weights(H, G + 1, 0, G + 1, gen, **dims)
    return ids, lengths, h_p, h_r, s1, s2


def run_step(op: str, device, ids, lengths, h_p, h_r, s1, s2, split=None, *more):
    """``torch.ops.care_ext.<op>`` on ``device`` with the conventions the step tests compare
    against (max_len 4000, cag eps 0 population, adv eps 1e-6 population); ``split``: the
    first_layer_split pieces (a list, possibly empty), passed only to ops that take them;
    ``more``: the private block op's further arguments (threads, prompts)."""
    d = lambda ts: [t.to(device) for t in ts]  # noqa: E731
    extra = [d(split)] if split is not None else []
    return getattr(torch.ops.care_ext, op)(ids.to(device), lengths.to(device), h_p.to(device),
                                           h_r.to(device), d(s1), d(s2), 4000.0, 0.0, False, 1e-6,
                                           False, *extra, *more)


def assert_step_like_reference(got, ids, lengths, h_p, h_r, s1, s2) -> None:
    """A step op's 10 outputs (on any device) against care_ext.reference.acquisition_step on the
    CPU inputs (max_len 4000, cag eps 0 population, adv eps 1e-6 population): integer and bool
    outputs exactly; the classifier outputs (reliability, stage1_logits, probs, ecag) by
    :func:`assert_like_torch` (the float32 path's own error is the yardstick); the rest to float32
    tolerance against float64."""
    ref64 = R.acquisition_step(ids, lengths, h_p, h_r, to64(s1), to64(s2), 4000.0, 0.0, False,
                               1e-6, False)
    ref32 = R.acquisition_step(ids, lengths, h_p, h_r, s1, s2, 4000.0, 0.0, False, 1e-6, False)
    assert len(got) == len(R.AcquisitionOutputs._fields)
    for name, g, r64, r32 in zip(R.AcquisitionOutputs._fields, got, ref64, ref32):
        if r64.dtype in (torch.int64, torch.bool):
            assert_exact(g, r64, name)
        elif name in ("reliability", "stage1_logits", "probs", "ecag"):
            assert_like_torch(g, r32, r64.double(), name)
        else:
            assert_close(g, r64, name)
