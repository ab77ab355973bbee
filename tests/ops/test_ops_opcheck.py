"""torch.library.opcheck on every op (schema, fake tensor, AOT dispatch) and torch.compile."""
from __future__ import annotations

import sys

import pytest
import torch

import care_ext
from care_ext.bf16_split import first_layer_split
from ops_testutil import R, random_ids, random_rewards, random_weights

pytestmark = pytest.mark.native


def _samples(device, shapes=((5, 8), (3, 1)), step_dtype=torch.float32, forward_mask=False):
    """op name -> argument tuples, one per (B, G) of ``shapes``: the public step and its fused
    twin get ``step_dtype`` hidden states; classifier_forward a random rollout mask if
    ``forward_mask``."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for B, G in shapes:
        ids = random_ids(B, G, gen).to(device)
        r1, r2 = random_rewards(B, G, gen, device), random_rewards(B, G, gen, device)
        sizes = R.cluster_stats(ids.cpu())[1].to(device)
        lengths = torch.randint(1, 100, (B, G), generator=gen).to(device)
        H = 24
        h_p, h_r = torch.randn(B, H, device=device), torch.randn(B, G, H, device=device)
        s1 = [t.to(device) for t in random_weights(H, G + 1, 1, 2, gen, P=8, R1=4, R2=8, K=6)]
        s2 = [t.to(device) for t in random_weights(H, G + 1, 0, G + 1, gen, P=8, R1=4, R2=8, K=6)]
        logits = torch.randn(B, G + 1, device=device)
        cag, adm = R.classwise_cag(sizes.cpu(), 0.0, False)
        out.setdefault("cluster_stats", []).append((ids,))
        out.setdefault("group_advantage", []).append((r1, 1e-6, True))
        out.setdefault("cag", []).append((r1, r2, 0.0, False))
        out.setdefault("classwise_cag", []).append((sizes, 1e-6, False))
        out.setdefault("expected_cag", []).append((logits, cag.to(device), adm.to(device)))
        out.setdefault("group_features", []).append((ids, lengths, 50.0, 0.0, False, 1e-6, False))
        mask = (torch.rand(B, G, generator=gen) < 0.5).to(device) if forward_mask else None
        out.setdefault("classifier_forward", []).append(
            (h_p, torch.rand(B, G + 1, device=device), h_r, None, mask, s2))
        out.setdefault("acquisition_step", []).append(
            (ids, lengths, h_p.to(step_dtype), h_r.to(step_dtype), s1, s2, 50.0, 0.0, False, 1e-6,
             False))
        out["_acquisition_step_fused"] = out["acquisition_step"]
        out.setdefault("_acquisition_step_fused_split", []).append(
            (ids, lengths, h_p.bfloat16(), h_r.bfloat16(), s1, s2, 50.0, 0.0, False, 1e-6, False,
             first_layer_split(s1, s2, H)))
        out["_acquisition_step_split"] = out["_acquisition_step_fused_split"]
        w = s1[2][:, :H]  # a folded first layer's hidden columns: a strided view
        out.setdefault("_split_bf16", []).append(
            (w, 3, torch.empty(3, *w.shape, dtype=torch.bfloat16, device=device)))
        hr = h_r.reshape(B * G, H).bfloat16()
        out.setdefault("_bf16_mm", []).append((hr, w.t().bfloat16()))
        out.setdefault("_column_stats", []).append((hr,))
        out.setdefault("_copy_into", []).append(
            ([torch.zeros_like(ids), torch.zeros_like(h_r).bfloat16()], [ids, h_r.bfloat16()]))
    return out


OPS = ["cluster_stats", "group_advantage", "cag", "classwise_cag", "expected_cag",
       "group_features", "classifier_forward", "acquisition_step", "_acquisition_step_fused",
       "_acquisition_step_fused_split", "_acquisition_step_split", "_split_bf16", "_bf16_mm",
       "_column_stats"]
CPU_ONLY_OPS = {"_acquisition_step_split", "_split_bf16", "_bf16_mm", "_column_stats"}


@pytest.mark.parametrize("name", OPS + ["_copy_into"])
def test_opcheck(device, name):
    if name in CPU_ONLY_OPS and torch.device(device).type != "cpu":
        pytest.skip(f"{name} has a CPU kernel only")
    for args in _samples(device)[name]:
        torch.library.opcheck(getattr(torch.ops.care_ext, name).default, args)


def test_build_info_op():
    info = care_ext.build_info()
    assert info["native"] is True
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["max_group_size"] == R.MAX_GROUP_SIZE
    assert isinstance(info["cuda"], bool)


@pytest.mark.skipif(not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
                    reason="torch's intra-op backend here is not OpenMP")
def test_cpu_kernels_are_built_to_use_torchs_threads():
    """at::parallel_for runs on torch's intra-op threads only when the library is compiled with
    OpenMP (setup.py's _openmp_flags); without it every CPU kernel ran on the calling thread."""
    assert care_ext.build_info()["intra_op_parallel"] is True


@pytest.mark.parametrize("name", OPS)
def test_cpu_outputs_do_not_depend_on_the_thread_count(name):
    """Every CPU kernel gives the same bits on 1, 2 and 3 intra-op threads (rows are split among
    threads, each row's arithmetic is fixed), on batches large enough to be split: 37 prompts of 8
    (the blocked step: 2 blocks, in parallel on 2 threads, one after the other on 3) and 300 of 4
    (5 blocks, in parallel), bf16 hidden states in the step, a rollout mask in the forward."""
    op = getattr(torch.ops.care_ext, name)
    if name == "_split_bf16":  # writes into its out argument: 50 rows of 1000, 4 chunks of rows
        w = torch.randn(50, 1003, generator=torch.Generator().manual_seed(3))[:, :1000]
        buf = torch.empty(3, 50, 1000, dtype=torch.bfloat16)
        cases = [(w, 3, buf)]

        def call(*args):
            op(*args)
            return args[2].clone()
    else:
        cases = _samples("cpu", ((37, 8), (300, 4)), torch.bfloat16, forward_mask=True)[name]
        call = op
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append([call(*args) for args in cases])
    finally:
        torch.set_num_threads(before)
    flat = [[t for o in run for t in (o if isinstance(o, (tuple, list)) else (o,))] for run in outs]
    for other in flat[1:]:
        assert all(torch.equal(a, b) for a, b in zip(flat[0], other)), name


@pytest.mark.compile
def test_torch_compile_fullgraph_matches_eager():
    gen = torch.Generator().manual_seed(1)
    B, G, H = 6, 8, 32
    ids = random_ids(B, G, gen)
    lengths = torch.randint(1, 100, (B, G), generator=gen)
    h_p, h_r = torch.randn(B, H), torch.randn(B, G, H)
    s1 = random_weights(H, G + 1, 1, 2, gen, P=8, R1=4, R2=8, K=6)
    s2 = random_weights(H, G + 1, 0, G + 1, gen, P=8, R1=4, R2=8, K=6)

    def step(ids, lengths, h_p, h_r):
        out = care_ext.acquisition_step(ids, lengths, h_p, h_r, s1, s2, max_len=100.0)
        adv = care_ext.group_advantage(out.pseudo_rewards * 2.0)
        return out.ecag + 1.0, out.reliability, adv, out.rank

    eager = step(ids, lengths, h_p, h_r)
    compiled = torch.compile(step, fullgraph=True)(ids, lengths, h_p, h_r)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)
