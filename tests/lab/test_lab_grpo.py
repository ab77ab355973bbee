"""The clipped GRPO loss and update on hand-made batches."""
import copy

import torch

from training.lab.grpo import GRPOConfig, clipped_policy_loss, grpo_update, make_optimizer
from training.lab.model import TinyGPT
from training.lab.rollout import sample_rollouts

torch.set_num_threads(1)


def test_loss_value_and_clipping_by_hand():
    old = torch.zeros(3, 2)
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    # ratios: row0 e^0.5 (>1.2, A>0: clipped at 1.2), row1 1.0, row2 e^-0.5 (<0.8, A<0: clipped 0.8)
    new = torch.tensor([[0.5, 0.5], [0.0, 9.0], [-0.5, -0.5]], requires_grad=True)
    adv = torch.tensor([1.0, 2.0, -1.0])
    loss, st = clipped_policy_loss(new, old, adv, mask, clip=0.2)
    expected = -((1.2 * 1) * 2 + 1.0 * 2 + (0.8 * -1) * 2) / 5
    assert abs(loss.item() - expected) < 1e-6
    assert abs(st["clip_frac"] - 4 / 5) < 1e-6
    loss.backward()
    # clipped tokens and masked tokens get no gradient; the unclipped one gets -A/N
    assert torch.all(new.grad[0] == 0) and torch.all(new.grad[2] == 0) and new.grad[1, 1] == 0
    assert abs(new.grad[1, 0].item() + 2.0 / 5) < 1e-6


def test_pessimistic_side_is_not_clipped():
    # ratio e^0.5 with a negative advantage: min() keeps the unclipped (worse) term -> gradient flows
    new = torch.full((1, 1), 0.5, requires_grad=True)
    loss, st = clipped_policy_loss(new, torch.zeros(1, 1), torch.tensor([-1.0]),
                                   torch.ones(1, 1, dtype=torch.bool), 0.2)
    loss.backward()
    assert st["clip_frac"] == 0 and abs(new.grad.item() - torch.exp(torch.tensor(0.5)).item()) < 1e-5


def test_weights_scale_the_loss():
    new = torch.randn(4, 3)
    old = new + 0.01 * torch.randn(4, 3)
    mask = torch.ones(4, 3, dtype=torch.bool)
    adv = torch.randn(4)
    l1, _ = clipped_policy_loss(new, old, adv, mask, 0.2)
    l2, _ = clipped_policy_loss(new, old, adv * 0.5, mask, 0.2)
    assert abs(l2.item() - 0.5 * l1.item()) < 1e-6


def _setup(seed=0):
    torch.manual_seed(seed)
    model = TinyGPT().eval()
    prompts = torch.randint(0, 10, (4, 9))
    ro = sample_rollouts(model, prompts, 4, 9, 1.0, torch.Generator().manual_seed(seed))
    return model, ro


def test_dropped_prompts_contribute_nothing():
    cfg = GRPOConfig(minibatches=1)
    model, ro = _setup()
    adv = torch.randn(4, 4)
    keep = torch.tensor([True, False, True, False])
    adv_garbage = adv.clone()
    adv_garbage[~keep] = 1e3  # whatever a dropped prompt carries must not matter
    outs = []
    for a in (adv, adv_garbage):
        m = copy.deepcopy(model)
        opt = make_optimizer(m, cfg)
        st = grpo_update(m, opt, ro, a, keep, cfg, torch.Generator().manual_seed(0))
        assert st["kept_rollouts"] == 8 and st["updates"] == 1
        outs.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(outs[0], outs[1])
    # and keeping every prompt does change the result
    m = copy.deepcopy(model)
    grpo_update(m, make_optimizer(m, cfg), ro, adv_garbage, torch.ones(4, dtype=torch.bool), cfg,
                torch.Generator().manual_seed(0))
    assert not torch.equal(outs[1], torch.cat([p.detach().flatten() for p in m.parameters()]))


def test_nothing_kept_means_no_update_and_minibatch_count():
    cfg = GRPOConfig(minibatches=2)
    model, ro = _setup(1)
    before = [p.detach().clone() for p in model.parameters()]
    st = grpo_update(model, make_optimizer(model, cfg), ro, torch.randn(4, 4),
                     torch.zeros(4, dtype=torch.bool), cfg, torch.Generator())
    assert st["updates"] == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    st = grpo_update(model, make_optimizer(model, cfg), ro, torch.randn(4, 4),
                     torch.ones(4, dtype=torch.bool), cfg, torch.Generator())
    assert st["updates"] == 2 and st["kept_rollouts"] == 16


def test_positive_advantage_raises_logprob():
    cfg = GRPOConfig(minibatches=1, lr=1e-2)
    model, ro = _setup(2)
    adv = torch.zeros(4, 4)
    adv[0, 0] = 1.0
    m = copy.deepcopy(model)
    grpo_update(m, make_optimizer(m, cfg), ro, adv, torch.ones(4, dtype=torch.bool), cfg, torch.Generator())
    from training.lab.rollout import score_responses
    with torch.no_grad():
        lp, _, _, _ = score_responses(m, ro.rollout_prompts[:1], ro.responses[:1], ro.lengths[:1])
    assert lp.sum() > ro.old_logprobs[0].sum()
