"""The CARE core with its classifiers on the GPU (CareConfig.device="cuda"); skipped without one.

A CPU-run controller and a CUDA-run one see the same batches; the CUDA one must run decide and
update without device errors (a class-weight tensor on the CPU broke update on the H200,
2026-11-26) and make decisions of the same kind.
"""
import pytest
import torch
from core_synth import make_batch, make_world

from care_ext.config import CareConfig
from care_ext.labels import GoldOracle
from care_ext.step import CareController


@pytest.mark.cuda
def test_care_on_cuda_runs_decide_and_update():
    world = make_world(B=32, G=8, H=16, seed=1)
    batches = [make_batch(world, s, seed=1) for s in range(4)]
    gold = {u: g for b in batches for u, g in b.gold.items()}
    ctl = CareController(CareConfig(strategy="care", group_size=8, device="cuda", warmup_steps=1),
                         GoldOracle(gold))
    for b in batches:
        kw = {k: v.cuda() if k != "lengths" else v for k, v in b.kwargs().items()}
        d = ctl.decide(b.uids, b.ids, **kw)
        assert d.labels_bought == 7  # ceil(0.2 * 32)
        assert torch.isfinite(d.weight).all()
        losses = ctl.update()
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_class_weights_follow_the_label_device():
    from care_ext.classifiers import class_weights
    labels = torch.tensor([0, 0, 1, 3])
    w = class_weights(labels, 5, 0.5, (0.25, 4.0))
    assert w.device == labels.device and w[2] == 0 and w[4] == 0 and w[0] < w[1]
