"""cluster_stats: native kernels against the reference twin, named edge cases, properties."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ops_testutil import B_GRID, G_GRID, R, assert_exact, random_ids

pytestmark = pytest.mark.native


def native(ids):
    return torch.ops.care_ext.cluster_stats(ids)


@pytest.mark.parametrize("G", G_GRID)
@pytest.mark.parametrize("B", B_GRID)
def test_matches_reference_grid(device, B, G):
    gen = torch.Generator().manual_seed(1000 * B + G)
    ids = random_ids(B, G, gen, device=device)
    rank, sizes = native(ids)
    ref_rank, ref_sizes = R.cluster_stats(ids.cpu())
    assert_exact(rank, ref_rank, "rank")
    assert_exact(sizes, ref_sizes, "sizes")
    assert rank.device == ids.device and sizes.device == ids.device


def test_non_contiguous(device):
    gen = torch.Generator().manual_seed(3)
    wide = random_ids(50, 16, gen, device=device)
    ids = wide[::2, ::2]  # strided view, [25, 8]
    assert not ids.is_contiguous()
    for got, want in zip(native(ids), R.cluster_stats(ids.cpu().contiguous())):
        assert_exact(got, want, "non-contiguous")


def _row(ids, device):
    rank, sizes = native(torch.tensor([ids], dtype=torch.long, device=device))
    return rank[0].tolist(), sizes[0].tolist()


def test_all_invalid(device):
    assert _row([-1] * 6, device) == ([-1] * 6, [0] * 6)


def test_other_negative_ids_are_invalid(device):
    assert _row([-7, 4, -2, 4], device) == ([-1, 0, -1, 0], [2, 0, 0, 0])


def test_one_cluster(device):
    assert _row([9] * 5, device) == ([0] * 5, [5, 0, 0, 0, 0])


def test_ties_first_occurrence_wins(device):
    # sizes 2, 2, 2: order by first occurrence of each id (5 first at 0, 3 at 1, 8 at 3)
    rank, sizes = _row([5, 3, 5, 8, 3, 8], device)
    assert rank == [0, 1, 0, 2, 1, 2]
    assert sizes == [2, 2, 2, 0, 0, 0]


def test_larger_cluster_beats_earlier_one(device):
    rank, sizes = _row([1, 2, 2, -1, 3, 2], device)
    assert rank == [1, 0, 0, -1, 2, 0]
    assert sizes == [3, 1, 1, 0, 0, 0]


def test_group_of_one(device):
    assert _row([4], device) == ([0], [1])
    assert _row([-1], device) == ([-1], [0])


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 64).flatmap(
    lambda G: st.lists(st.integers(-1, 6), min_size=G, max_size=G)), st.randoms())
def test_properties(ids_list, rnd):
    ids = torch.tensor([ids_list], dtype=torch.long)
    G = ids.shape[1]
    rank, sizes = native(ids)
    valid = ids >= 0
    # sizes sum to the valid count, are sorted descending, majority is the largest cluster
    assert sizes.sum().item() == valid.sum().item()
    assert torch.all(sizes[0, :-1] >= sizes[0, 1:])
    if valid.any():
        counts = torch.bincount(ids[valid])
        assert sizes[0, 0].item() == counts.max().item()
        # the majority cluster's members are exactly rank 0
        assert (rank == 0).sum().item() == sizes[0, 0].item()
    # every response's rank points to a cluster of its own id's size
    for i in range(G):
        if ids_list[i] >= 0:
            assert sizes[0, rank[0, i]].item() == ids_list.count(ids_list[i])
        else:
            assert rank[0, i].item() == -1
    # invariance to relabelling the ids (a bijection on valid labels)
    labels = sorted({v for v in ids_list if v >= 0})
    shuffled = labels[:]
    rnd.shuffle(shuffled)
    mapping = {a: 1000 + 13 * b for a, b in zip(labels, shuffled)}
    relabelled = torch.tensor([[mapping.get(v, -1) for v in ids_list]], dtype=torch.long)
    r2, s2 = native(relabelled)
    assert torch.equal(r2, rank) and torch.equal(s2, sizes)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-1, 4), min_size=2, max_size=16), st.randoms())
def test_permutation_moves_ranks_with_responses_when_no_ties(ids_list, rnd):
    ids = torch.tensor([ids_list], dtype=torch.long)
    _, sizes = native(ids)
    perm = list(range(len(ids_list)))
    rnd.shuffle(perm)
    permuted = torch.tensor([[ids_list[p] for p in perm]], dtype=torch.long)
    r2, s2 = native(permuted)
    assert torch.equal(s2, sizes)  # sizes never depend on order
    nonzero = [s for s in sizes[0].tolist() if s]
    if len(nonzero) == len(set(nonzero)):  # no size ties -> ranks follow the responses
        rank = native(ids)[0][0].tolist()
        assert r2[0].tolist() == [rank[p] for p in perm]
