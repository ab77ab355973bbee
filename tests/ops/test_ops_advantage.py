"""group_advantage and cag: native kernels against the float64 reference twin."""
from __future__ import annotations

import math

import pytest
import torch

from ops_testutil import B_GRID, G_GRID, R, assert_close, random_rewards

pytestmark = pytest.mark.native


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("G", G_GRID)
@pytest.mark.parametrize("B", B_GRID)
def test_group_advantage_grid(device, B, G, unbiased):
    gen = torch.Generator().manual_seed(B * 7 + G)
    r = random_rewards(B, G, gen, device=device)
    got = torch.ops.care_ext.group_advantage(r, 1e-6, unbiased)
    assert got.dtype == torch.float32 and got.device == r.device
    assert_close(got, R.group_advantage(r.cpu().double(), 1e-6, unbiased), "advantage")


def test_group_advantage_float64_and_non_contiguous(device):
    gen = torch.Generator().manual_seed(5)
    r = random_rewards(40, 16, gen, device=device).double()[:, ::2]
    assert not r.is_contiguous()
    got = torch.ops.care_ext.group_advantage(r, 0.0, False)
    assert got.dtype == torch.float64
    assert_close(got, R.group_advantage(r.cpu(), 0.0, False), "advantage f64", rtol=1e-12,
                 atol=1e-12)


def test_constant_rows_are_exactly_zero(device):
    r = torch.tensor([[1.0] * 8, [0.0] * 8, [0.3] * 8], device=device)
    for eps in (0.0, 1e-6):
        assert torch.equal(torch.ops.care_ext.group_advantage(r, eps, True),
                           torch.zeros_like(r))


def test_g1_is_zero(device):
    r = torch.tensor([[1.0], [0.0]], device=device)
    assert torch.equal(torch.ops.care_ext.group_advantage(r, 1e-6, True), torch.zeros_like(r))


def test_known_values(device):
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]], device=device)
    pop = torch.ops.care_ext.group_advantage(r, 0.0, False)
    samp = torch.ops.care_ext.group_advantage(r, 0.0, True)
    assert torch.allclose(pop.cpu(), torch.tensor([[1.0, -1.0, -1.0, 1.0]]))
    s = math.sqrt(4 / 3) * 0.5  # sample std of [1,0,0,1]
    assert torch.allclose(samp.cpu(), torch.tensor([[0.5, -0.5, -0.5, 0.5]]) / s)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("G", G_GRID)
@pytest.mark.parametrize("B", B_GRID)
def test_cag_grid(device, B, G, unbiased):
    gen = torch.Generator().manual_seed(B * 11 + G)
    gt = random_rewards(B, G, gen, device=device)
    ps = random_rewards(B, G, gen, device=device)
    got = torch.ops.care_ext.cag(gt, ps, 1e-6, unbiased)
    assert got.shape == (B,)
    assert_close(got, R.cag(gt.cpu().double(), ps.cpu().double(), 1e-6, unbiased), "cag")


def test_cag_identical_vectors_is_zero(device):
    gen = torch.Generator().manual_seed(2)
    r = random_rewards(30, 8, gen, device=device)
    assert torch.equal(torch.ops.care_ext.cag(r, r, 1e-6, False), torch.zeros(30, device=device))


def test_cag_sqrt_g_when_truth_absent(device):
    # wrong majority of size 3 in G = 8, no correct response: CAG = sqrt(G) (population, eps = 0)
    ps = torch.tensor([[1.0, 1, 1, 0, 0, 0, 0, 0]], device=device)
    gt = torch.zeros_like(ps)
    assert abs(torch.ops.care_ext.cag(gt, ps, 0.0, False).item() - math.sqrt(8)) < 1e-6
