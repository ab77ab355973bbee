"""classwise_cag and expected_cag: native kernels against the reference twin."""
from __future__ import annotations

import math

import pytest
import torch

from ops_testutil import B_GRID, G_GRID, R, assert_close, assert_exact, random_ids

pytestmark = pytest.mark.native


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("G", G_GRID)
@pytest.mark.parametrize("B", B_GRID)
def test_classwise_grid(device, B, G, unbiased):
    gen = torch.Generator().manual_seed(B * 3 + G)
    _, sizes = R.cluster_stats(random_ids(B, G, gen))
    cag, adm = torch.ops.care_ext.classwise_cag(sizes.to(device), 1e-6, unbiased)
    ref_cag, ref_adm = R.classwise_cag(sizes, 1e-6, unbiased, dtype=torch.float64)
    assert cag.dtype == torch.float32 and cag.shape == (B, G + 1)
    assert_exact(adm, ref_adm, "admissible")
    assert_close(cag, ref_cag, "classwise cag")


def test_closed_form_population_eps0(device):
    """CAG^2 = 2G + 2G sqrt(xk/((G-x)(G-k))) for k > 0, sqrt(G) for k = 0 (ARCHITECTURE §3)."""
    G = 8
    for x in range(1, G):
        for k in range(0, min(x, G - x) + 1):
            sizes = torch.zeros(1, G, dtype=torch.long)
            sizes[0, 0] = x
            if k:
                sizes[0, 1] = k
            cag, adm = torch.ops.care_ext.classwise_cag(sizes.to(device), 0.0, False)
            want = math.sqrt(G) if k == 0 else math.sqrt(
                2 * G + 2 * G * math.sqrt(x * k / ((G - x) * (G - k))))
            assert adm[0, k].item()
            assert abs(cag[0, k].item() - want) < 1e-5, (x, k)


def test_row_equals_cag_of_constructed_vectors(device):
    """cag[b, k] equals the cag op on the two reward vectors it stands for (any positions)."""
    gen = torch.Generator().manual_seed(9)
    G = 16
    ids = random_ids(200, G, gen)
    rank, sizes = R.cluster_stats(ids)
    cag, adm = torch.ops.care_ext.classwise_cag(sizes.to(device), 1e-6, True)
    for b in range(200):
        r_ps = (rank[b] == 0).double()
        for k in adm[b].nonzero().flatten().tolist():
            # truth = the whole cluster of size k, if k > 0 (take the last cluster of that size)
            r_gt = torch.zeros(G, dtype=torch.float64)
            if k:
                j = max(j for j in range(1, G) if sizes[b, j] == k)
                r_gt = (rank[b] == j).double()
            want = R.cag(r_gt[None], r_ps[None], 1e-6, True).item()
            assert abs(cag[b, k].item() - want) < 1e-5 * max(1.0, want), (b, k)


def test_all_invalid_and_unanimous_rows(device):
    sizes = torch.tensor([[0, 0, 0, 0], [4, 0, 0, 0]], dtype=torch.long, device=device)
    cag, adm = torch.ops.care_ext.classwise_cag(sizes, 0.0, False)
    assert adm.cpu().tolist() == [[True, False, False, False, False]] * 2
    assert torch.equal(cag.cpu(), torch.zeros(2, 5))


def test_malformed_sizes_stay_in_bounds(device):
    # sizes that no clustering produces: x > G, negative, minority larger than majority
    sizes = torch.tensor([[9, 1, 1, 0], [-3, 2, 0, 0], [2, 3, 1, 0], [3, 3, 0, 0]],
                         dtype=torch.long, device=device)
    cag, adm = torch.ops.care_ext.classwise_cag(sizes, 0.0, False)
    ref_cag, ref_adm = R.classwise_cag(sizes.cpu(), 0.0, False, dtype=torch.float64)
    assert_exact(adm, ref_adm, "admissible")
    assert_close(cag, ref_cag, "cag")
    assert adm[0].tolist() == [True] + [False] * 4  # x > G treated as "no valid answer"
    assert adm[2].tolist() == [True, True, False, False, False]  # 3 > x = 2 not admissible


@pytest.mark.parametrize("C", [1, 2, 6, 9, 17, 65])
@pytest.mark.parametrize("B", B_GRID)
def test_expected_cag_grid(device, B, C):
    gen = torch.Generator().manual_seed(B + C)
    logits = torch.randn(B, C, generator=gen) * 3
    cag = torch.rand(B, C, generator=gen) * 6
    adm = torch.rand(B, C, generator=gen) < 0.5
    if C:
        adm[: B // 2, 0] = True
    probs, ecag = torch.ops.care_ext.expected_cag(logits.to(device), cag.to(device), adm.to(device))
    rp, re = R.expected_cag(logits.double(), cag.double(), adm)
    assert_close(probs, rp, "probs")
    assert_close(ecag, re, "ecag")
    assert torch.all(probs.cpu()[~adm] == 0)


def test_expected_only_k0_admissible(device):
    logits = torch.tensor([[5.0, -1.0, 2.0]], device=device)
    cag = torch.tensor([[2.5, 7.0, 9.0]], device=device)
    adm = torch.tensor([[True, False, False]], device=device)
    probs, ecag = torch.ops.care_ext.expected_cag(logits, cag, adm)
    assert probs.cpu().tolist() == [[1.0, 0.0, 0.0]]
    assert abs(ecag.item() - 2.5) < 1e-6


def test_expected_single_admissible_class_elsewhere(device):
    logits = torch.tensor([[-50.0, 3.0, 40.0]], device=device)
    adm = torch.tensor([[False, False, True]], device=device)
    probs, ecag = torch.ops.care_ext.expected_cag(logits, torch.ones(1, 3, device=device) * 4, adm)
    assert probs.cpu().tolist() == [[0.0, 0.0, 1.0]] and abs(ecag.item() - 4) < 1e-6


def test_expected_no_admissible_class_gives_zeros(device):
    logits = torch.randn(2, 4, device=device)
    probs, ecag = torch.ops.care_ext.expected_cag(logits, torch.ones(2, 4, device=device),
                                                  torch.zeros(2, 4, dtype=torch.bool, device=device))
    assert torch.equal(probs.cpu(), torch.zeros(2, 4)) and torch.equal(ecag.cpu(), torch.zeros(2))


def test_expected_large_logits_are_stable(device):
    logits = torch.tensor([[1000.0, 999.0, -1000.0]], device=device)
    adm = torch.ones(1, 3, dtype=torch.bool, device=device)
    probs, _ = torch.ops.care_ext.expected_cag(logits, torch.zeros(1, 3, device=device), adm)
    assert torch.isfinite(probs).all()
    assert abs(probs[0, 0].item() - 1 / (1 + math.exp(-1))) < 1e-6


def test_expected_non_finite_logits_like_the_reference(device):
    """NaN and infinite logits on both sides of the 16-class chunks admissible_max reads its flags
    in: an admissible NaN anywhere (class 3, 17 or 20) makes the row's softmax NaN, an inadmissible
    one is ignored, an admissible +inf or an all -inf row give what the reference gives (NaN)."""
    gen = torch.Generator().manual_seed(7)
    B, C = 7, 33
    logits = torch.randn(B, C, generator=gen)
    cag = torch.rand(B, C, generator=gen)
    adm = torch.rand(B, C, generator=gen) < 0.6
    adm[:, 0] = True
    nan, inf = float("nan"), float("inf")
    logits[0, 20], adm[0, 20] = nan, True    # admissible NaN in the second chunk
    logits[1, 20], adm[1, 20] = nan, False   # inadmissible NaN: ignored
    logits[2, :] = -inf                      # every logit -inf
    logits[3, 31], adm[3, 31] = inf, True    # admissible +inf in the last chunk
    logits[4, 3], logits[4, 17] = nan, nan   # two admissible NaNs, two chunks
    adm[4, 3] = adm[4, 17] = True
    adm[5, 1:] = False                       # one admissible class, in the first chunk
    adm[6, :16] = False
    adm[6, 16] = True                        # the first admissible class opens the second chunk
    probs, ecag = torch.ops.care_ext.expected_cag(logits.to(device), cag.to(device), adm.to(device))
    rp, re = R.expected_cag(logits.double(), cag.double(), adm)
    for got, ref in ((probs.cpu(), rp), (ecag.cpu(), re)):
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        assert torch.allclose(got.double(), ref, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert not torch.isnan(probs[1]).any() and torch.isnan(probs[0, adm[0]]).all()
