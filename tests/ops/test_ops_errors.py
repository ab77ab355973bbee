"""Bad input fails with a message that names the argument; B = 0 works."""
from __future__ import annotations

import pytest
import torch

from ops_testutil import random_weights

pytestmark = pytest.mark.native
ops = torch.ops.care_ext if hasattr(torch.ops, "care_ext") else None


def _raises(match, fn, *args):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


def test_cluster_stats_errors():
    _raises(r"ids must be a 2-D", torch.ops.care_ext.cluster_stats, torch.zeros(3, dtype=torch.long))
    _raises(r"ids must have dtype Long", torch.ops.care_ext.cluster_stats, torch.zeros(2, 3))
    _raises(r"ids has G = 65", torch.ops.care_ext.cluster_stats,
            torch.zeros(2, 65, dtype=torch.long))
    _raises(r"ids has G = 0", torch.ops.care_ext.cluster_stats, torch.zeros(2, 0, dtype=torch.long))


def test_advantage_and_cag_errors():
    _raises(r"rewards must be float32 or float64", torch.ops.care_ext.group_advantage,
            torch.zeros(2, 3, dtype=torch.long), 0.0, False)
    _raises(r"rewards must be a 2-D", torch.ops.care_ext.group_advantage, torch.zeros(2, 3, 4),
            0.0, False)
    _raises(r"r_ps has shape", torch.ops.care_ext.cag, torch.zeros(2, 3), torch.zeros(2, 4), 0.0,
            False)
    _raises(r"r_ps must have dtype Float", torch.ops.care_ext.cag, torch.zeros(2, 3),
            torch.zeros(2, 3, dtype=torch.float64), 0.0, False)


def test_cag_family_errors():
    _raises(r"sizes must have dtype Long", torch.ops.care_ext.classwise_cag, torch.zeros(2, 3), 0.0,
            False)
    _raises(r"admissible must have dtype Bool", torch.ops.care_ext.expected_cag, torch.zeros(2, 3),
            torch.zeros(2, 3), torch.zeros(2, 3))
    _raises(r"cag has shape", torch.ops.care_ext.expected_cag, torch.zeros(2, 3), torch.zeros(2, 4),
            torch.zeros(2, 3, dtype=torch.bool))


def test_group_features_errors():
    ids = torch.zeros(2, 4, dtype=torch.long)
    _raises(r"lengths has shape", torch.ops.care_ext.group_features, ids, torch.zeros(2, 5), 10.0,
            0.0, False, 0.0, False)
    _raises(r"max_len must be a finite positive", torch.ops.care_ext.group_features, ids,
            torch.zeros(2, 4), 0.0, 0.0, False, 0.0, False)


def test_classifier_weight_errors():
    gen = torch.Generator().manual_seed(0)
    B, G, H = 2, 4, 16
    ids = torch.zeros(B, G, dtype=torch.long)
    lengths = torch.ones(B, G)
    h_p, h_r = torch.randn(B, H), torch.randn(B, G, H)
    s1 = random_weights(H, G + 1, 1, 2, gen)
    s2 = random_weights(H, G + 1, 0, G + 1, gen)
    step = torch.ops.care_ext.acquisition_step
    _raises(r"stage1 must hold 10 tensors", step, ids, lengths, h_p, h_r, s1[:9], s2, 10.0, 0.0,
            False, 0.0, False)
    bad = list(s2)
    bad[2] = torch.randn(64, H + 1)
    _raises(r"stage2\[2\] \(resp1_w\) must have shape \[64, 16\]", step, ids, lengths, h_p, h_r,
            s1, bad, 10.0, 0.0, False, 0.0, False)
    _raises(r"stage2 has 2 output classes, expected 5", step, ids, lengths, h_p, h_r, s1,
            random_weights(H, G + 1, 0, 2, gen), 10.0, 0.0, False, 0.0, False)
    bad = list(s1)
    bad[0] = bad[0].double()
    _raises(r"stage1\[0\] \(prompt_w\) must be float32", step, ids, lengths, h_p, h_r, bad, s2,
            10.0, 0.0, False, 0.0, False)
    _raises(r"h_resp must have shape \[B, G, H\]", step, ids, lengths, h_p, h_r[:, :3], s1, s2,
            10.0, 0.0, False, 0.0, False)
    _raises(r"h_prompt must be float32, bfloat16 or float16", step, ids, lengths, h_p.long(), h_r,
            s1, s2, 10.0, 0.0, False, 0.0, False)
    _raises(r"resp_mask must be a bool", torch.ops.care_ext.classifier_forward, h_p,
            torch.rand(B, G + 1), h_r, None, torch.ones(B, G), s2)


@pytest.mark.cuda
def test_device_mismatch_named():
    ids = torch.zeros(2, 4, dtype=torch.long, device="cuda")
    _raises(r"lengths is on cpu but ids is on cuda", torch.ops.care_ext.group_features, ids,
            torch.zeros(2, 4), 10.0, 0.0, False, 0.0, False)
    _raises(r"r_ps is on cpu", torch.ops.care_ext.cag, torch.zeros(2, 3, device="cuda"),
            torch.zeros(2, 3), 0.0, False)


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["acquisition_step", "_acquisition_step_fused",
                                "_acquisition_step_fused_split"])
def test_step_device_mismatch_named(op):
    """Any CUDA argument sends a step op to its CUDA kernel; ids on the CPU, or one classifier's
    weights alone on the GPU, must still get the message that names the argument (the fused
    kernel once set a CUDAGuard on ids' device first: "CUDAGuardImpl initialized with non-CUDA
    DeviceType")."""
    from care_ext.bf16_split import first_layer_split

    gen = torch.Generator().manual_seed(0)
    B, G, H = 3, 4, 16
    ids, lengths = torch.zeros(B, G, dtype=torch.long), torch.ones(B, G)
    h_p, h_r = torch.randn(B, H), torch.randn(B, G, H)
    s1 = random_weights(H, G + 1, 1, 2, gen)
    s2 = random_weights(H, G + 1, 0, G + 1, gen)
    cu = lambda ts: [t.cuda() for t in ts]  # noqa: E731
    split = [cu(first_layer_split(s1, s2, H))] if op.endswith("_split") else []
    fn = getattr(torch.ops.care_ext, op)
    conv = (10.0, 0.0, False, 0.0, False)
    _raises(r"must be on the device of ids \(cpu\)", fn, ids, lengths, h_p.cuda(), h_r.cuda(),
            cu(s1), cu(s2), *conv, *split)
    _raises(r"stage1\[0\] \(prompt_w\) is on cuda:0 but the inputs are on cpu", fn, ids, lengths,
            h_p, h_r, cu(s1), s2, *conv, *split)


def test_empty_batch_everywhere(device):
    G = 8
    ids = torch.zeros(0, G, dtype=torch.long, device=device)
    rank, sizes = torch.ops.care_ext.cluster_stats(ids)
    assert rank.shape == (0, G) and sizes.shape == (0, G)
    assert torch.ops.care_ext.group_advantage(torch.zeros(0, G, device=device), 0.0, False).shape == (0, G)
    cag, adm = torch.ops.care_ext.classwise_cag(sizes, 0.0, False)
    assert cag.shape == (0, G + 1) and adm.shape == (0, G + 1)
