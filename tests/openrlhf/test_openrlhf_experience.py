"""The CARE experience-maker hook on real OpenRLHF 0.11.2 Experiences: G-consecutive rollouts cut
across micro-batches, rewards overwritten, prompt weights on the stock advantages, the true drop."""
import json
from types import SimpleNamespace as NS

import pytest
import torch
from orl_testutil import raw_sample, word_tokenizer

from care_ext.answers import AnswerClusterer
from care_ext.decision import BOUGHT, DROPPED
from care_ext.integrations.openrlhf.config import OpenRLHFCareOptions
from care_ext.integrations.openrlhf.experience import CareExperienceMaker, remove_dropped
from care_ext.integrations.openrlhf.labels import make_label
from care_ext.integrations.openrlhf.reward_func import reward_func
from care_ext.integrations.openrlhf.runner import CareRunner

G = 4
# prompt -> (gold, G answers): majority right / majority wrong (truth present) / majority wrong (3-1)
PROMPTS = [("3", ["3", "3", "5", "3"]), ("7", ["2", "2", "7", "2"]), ("1", ["4", "4", "4", "1"])]
WORDS = ["what", "is", "q0", "q1", "q2", "so"] + [f"\\boxed{{{a}}}" for a in "1234567"]


def _args(micro=5, dp=1, train_micro=2, train_batch=4, dynamic=False, max_tokens=16):
    return NS(
        train=NS(dynamic_batch_enable=dynamic, micro_batch_size=train_micro, batch_size=train_batch,
                 max_tokens_per_gpu=max_tokens),
        rollout=NS(micro_batch_size=micro, n_samples_per_prompt=G, batch_size=len(PROMPTS),
                   max_tokens_per_gpu=max_tokens),
        algo=NS(advantage=NS(estimator="group_norm", gamma=1.0, lambd=1.0, no_std_norm=False),
                kl=NS(use_loss=True, estimator="k3")),
        reward=NS(clip_range=None, overlong_buffer_len=None, overlong_penalty_factor=1.0,
                  stop_properly_penalty_coef=None),
        data=NS(max_len=64),
        actor=NS(num_nodes=1, num_gpus_per_node=dp), ds=NS(ring_attn_size=1, tensor_parallel_size=1))


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def clusterer():
    c = AnswerClusterer(workers=0)
    yield c
    c.close()


def _rollouts(tok):
    """B*G single-sample Experiences, G-consecutive per prompt, rewards from the shipped reward_func."""
    out = []
    for b, (gold, answers) in enumerate(PROMPTS):
        prompt = f"what is q{b}"
        label = make_label(f"p{b}", gold, "math")
        for a in answers:
            resp = ["so", f"\\boxed{{{a}}}"]
            r = float(reward_func([prompt + " " + " ".join(resp)], [prompt], [label])["rewards"][0])
            out.append(raw_sample(tok, prompt.split(), resp, label, prompt, r))
    return out


def _maker(tok, args, runner):
    m = CareExperienceMaker.__new__(CareExperienceMaker)
    m.strategy, m.args, m.tokenizer = NS(args=args), args, tok
    m.advantage_estimator = args.algo.advantage.estimator
    m.kl_ctl = NS(value=0.0)
    m.care, m.capture = runner, False
    return m


def _after_forward(experiences):
    """What the stock make_experience attaches when KL is a loss (kl zeros)."""
    for e in experiences:
        e.action_log_probs = torch.zeros(e.action_mask.shape)
        e.kl = torch.zeros(e.action_mask.shape)
        e.info["kl"] = torch.zeros(e.sequences.shape[0])
    return experiences


def _run(tok, clusterer, tmp_path, strategy, args=None, reverse=False, **core):
    args = args or _args()
    opts = OpenRLHFCareOptions(core={"strategy": strategy, "seed": 0, **core})
    runner = CareRunner(opts, G, tok, str(tmp_path), clusterer=clusterer)
    maker = _maker(tok, args, runner)
    exps = _after_forward(maker.split_rollout_samples(_rollouts(tok)))
    assert [len(e.index) for e in exps] == [5, 5, 2]  # micro-batches cut across the G=4 groups
    if reverse:  # the regrouping must follow index // G, not the micro-batch order
        exps = exps[::-1]
    d = runner.decide(exps, None)
    exps = maker.compute_advantages_and_returns(exps)
    return maker, runner, d, exps


def _by_index(exps, field):
    out = {}
    for e in exps:
        v = getattr(e, field) if field != "weight" else e.info["care/weight"]
        for r, i in enumerate(e.index):
            out[int(i)] = v[r]
    return out


def _stock_group_norm(r):
    r = torch.tensor(r, dtype=torch.float32)
    return (r - r.mean()) / (r.std() + 1e-9)


GOLD_R = [[float(a == g) for a in ans] for g, ans in PROMPTS]
PSEUDO_R = [[1, 1, 0, 1], [1, 1, 0, 1], [1, 1, 1, 0]]


@pytest.mark.parametrize("reverse", [False, True])
def test_ttrl_overwrites_rewards_with_majority_vote(tok, clusterer, tmp_path, reverse):
    _, _, d, exps = _run(tok, clusterer, tmp_path, "ttrl", reverse=reverse)
    rew, adv = _by_index(exps, "rewards"), _by_index(exps, "advantages")
    fn = {}
    for e in exps:
        for r, i in enumerate(e.index):
            fn[int(i)] = float(e.info["care/reward_fn"][r])
            assert float(e.info["reward"][r]) == float(e.rewards[r])
    for b in range(3):
        assert [float(rew[b * G + j]) for j in range(G)] == PSEUDO_R[b]
        assert [fn[b * G + j] for j in range(G)] == GOLD_R[b]  # the reward function's value is kept
        want = _stock_group_norm(PSEUDO_R[b])
        for j in range(G):
            row_adv = adv[b * G + j]
            assert torch.allclose(row_adv[row_adv != 0], want[j].expand(int((row_adv != 0).sum())), atol=1e-5) \
                or float(want[j]) == 0.0
    assert d.labels_bought == 0


def test_gt_buys_every_prompt_and_trains_on_gold(tok, clusterer, tmp_path):
    _, runner, d, exps = _run(tok, clusterer, tmp_path, "gt")
    assert (d.source == BOUGHT).all()
    rew = _by_index(exps, "rewards")
    for b in range(3):
        assert [float(rew[b * G + j]) for j in range(G)] == GOLD_R[b]
    m = runner.after_policy_update()
    assert m["care/n_bought"] == 3.0 and m["care/budget/labels_total"] == 3.0


def test_weights_scale_advantages_and_zero_dropped_groups(tok, clusterer, tmp_path):
    _, _, d, exps = _run(tok, clusterer, tmp_path, "random-mask", budget_frac=0.34)
    bought = (d.source == BOUGHT).nonzero().flatten().tolist()
    assert len(bought) == 2 and int((d.source == DROPPED).sum()) == 1
    adv, rew, w = _by_index(exps, "advantages"), _by_index(exps, "rewards"), _by_index(exps, "weight")
    resp_mask = _by_index(exps, "action_mask")
    for b in range(3):
        for j in range(G):
            i = b * G + j
            if b in bought:
                assert float(w[i]) == 1.0
                want = _stock_group_norm(GOLD_R[b])[j]
                assert torch.allclose(adv[i][resp_mask[i]], want.expand(int(resp_mask[i].sum())), atol=1e-5)
                assert float(rew[i]) == GOLD_R[b][j]
            else:
                assert float(w[i]) == 0.0 and torch.count_nonzero(adv[i]) == 0


@pytest.mark.parametrize("granularity,rows_per_exp,n_exps", [(4, 2, 4), (12, 4, 3)])
def test_true_drop_removes_dropped_rows(tok, clusterer, tmp_path, granularity, rows_per_exp, n_exps):
    maker, _, d, exps = _run(tok, clusterer, tmp_path, "random-mask", budget_frac=0.34)
    kept_groups = set((d.source != DROPPED).nonzero().flatten().tolist())
    out = remove_dropped(exps, granularity, rows_per_exp, tok.pad_token_id)
    assert len(out) == n_exps and all(e.sequences.shape[0] == rows_per_exp for e in out)
    idx = [int(i) for e in out for i in e.index]
    assert idx == sorted(idx)
    kept = [i for i in idx if i // G in kept_groups]
    assert sorted(kept) == [b * G + j for b in sorted(kept_groups) for j in range(G)]  # every kept row stays
    filler = [i for i in idx if i // G not in kept_groups]
    assert len(filler) == max(0, granularity - len(kept))
    for e in out:  # fillers carry zero advantage; the per-sample info survives the repack
        for r, i in enumerate(e.index):
            assert (float(e.info["care/weight"][r]) == 0.0) == (int(i) // G not in kept_groups)
            if int(i) // G not in kept_groups:
                assert torch.count_nonzero(e.advantages[r]) == 0
        assert e.info["reward"].shape == (rows_per_exp,)


def _remove_batch(tok, clusterer, tmp_path, monkeypatch, args):
    """make_experience_batch with --care.drop_mode remove (random-mask keeps 2 of the 3 prompts)."""
    opts = OpenRLHFCareOptions(drop_mode="remove", core={"strategy": "random-mask", "budget_frac": 0.34})
    runner = CareRunner(opts, G, tok, str(tmp_path), clusterer=clusterer)
    maker = _maker(tok, args, runner)

    def forward_only(samples_list):  # the stock make_experience minus the Ray forwards, then CARE
        exps = _after_forward(samples_list)
        runner.decide(exps, None)
        return exps
    monkeypatch.setattr(maker, "make_experience", forward_only)
    return runner, maker.make_experience_batch(_rollouts(tok))


@pytest.mark.parametrize("dp,micro,train_batch,rows", [(2, 2, 4, 8), (1, 2, 8, 8), (1, 1, 3, 9), (2, 1, 6, 12),
                                                      (2, 2, 12, 12)])
def test_drop_mode_remove_keeps_whole_optimizer_steps(tok, clusterer, tmp_path, monkeypatch, dp, micro,
                                                      train_batch, rows):
    runner, out = _remove_batch(tok, clusterer, tmp_path, monkeypatch,
                                _args(dp=dp, train_micro=micro, train_batch=train_batch))
    w = [float(x) for e in out for x in e.info["care/weight"]]
    assert len(w) == rows and rows % train_batch == 0  # whole optimizer steps, all ranks together
    assert sum(x != 0.0 for x in w) == 8  # the 2 kept prompts x G, all of them
    assert runner.last_metrics["care/rows_trained"] == rows and runner.last_metrics["care/rows_filler"] == rows - 8
    # OpenRLHF hands the list to the DP ranks in equal contiguous chunks; each rank then runs a whole
    # number of gradient-accumulation windows (gas micro-batches of `micro` rows)
    assert all(e.sequences.shape[0] == micro for e in out) and len(out) % dp == 0
    gas = train_batch // (dp * micro)
    assert (len(out) // dp) % gas == 0


def test_drop_mode_docstring_states_what_remove_keeps():
    """The ``drop_mode`` option's docstring (the flag's reference in the code) names the
    granularity the test above checks: whole ``--train.batch_size`` steps, not DP x micro."""
    import ast
    import inspect

    from care_ext.integrations.openrlhf import config

    body = ast.parse(inspect.getsource(config.OpenRLHFCareOptions)).body[0].body
    doc = next(body[i + 1].value.value for i, node in enumerate(body)
               if isinstance(node, ast.AnnAssign) and node.target.id == "drop_mode")
    text = " ".join(doc.split())
    assert "multiple of ``--train.batch_size``" in text
    assert "divisible by DP ranks x ``--train.micro_batch_size``" not in text


def test_drop_mode_remove_rejects_a_train_batch_that_dp_cannot_split(tok, clusterer, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not a multiple of DP ranks 2"):
        _remove_batch(tok, clusterer, tmp_path, monkeypatch, _args(dp=2, train_micro=2, train_batch=6))


@pytest.fixture
def one_rank_dp_group():
    """A real gloo process group of one rank with a ``dp`` device mesh, for the replay buffer's
    dynamic-batch set-up."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import socket

    with socket.socket() as s:  # a free port (a fixed one can be taken on a shared machine)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    finally:
        dist.destroy_process_group()


def _replay_buffer_trained_rows(args, mesh, shard, monkeypatch):
    """Rows of one rank's shard that OpenRLHF's replay buffer puts into dynamic micro-batches.
    (``torch.cuda.current_device`` answers 0 to name the buffer's target device, then ``cpu`` for
    the counters the set-up all-reduces.)"""
    from openrlhf.trainer.ppo_utils.replay_buffer import NaiveReplayBuffer
    from openrlhf.utils.deepspeed import DeepspeedStrategy

    strategy = DeepspeedStrategy.__new__(DeepspeedStrategy)  # the fields setup_dynamic_batch reads
    strategy.args, strategy.ds_device_mesh, strategy.world_size = args, mesh, 1
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    buf = NaiveReplayBuffer(1, cpu_offload=False, dynamic_batch=True)
    buf.append(shard)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    buf.setup_dynamic_batch(strategy)
    return len(buf.items), sorted(i for mb in buf.dynamic_indices for i in mb)


def test_drop_mode_remove_with_dynamic_batching(tok, clusterer, tmp_path, monkeypatch, one_rank_dp_group):
    from openrlhf.trainer.ppo_utils.experience import balance_experiences

    args = _args(dp=1, train_micro=2, train_batch=6, dynamic=True)
    runner, out = _remove_batch(tok, clusterer, tmp_path, monkeypatch, args)
    assert sum(e.sequences.shape[0] for e in out) == 12  # 8 kept rows -> 2 whole steps of 6
    # for contrast: the kept rows alone (a multiple of DP x micro, not of train_batch)
    short = remove_dropped(out, 2, 2, tok.pad_token_id)
    short = [e for e in short if float(e.info["care/weight"].abs().sum()) != 0.0]
    assert sum(e.sequences.shape[0] for e in short) == 8
    shards = balance_experiences(out, args)  # what train_step does under dynamic batching
    assert len(shards) == 1
    n, trained = _replay_buffer_trained_rows(args, one_rank_dp_group, shards[0], monkeypatch)
    assert n == 12 and trained == list(range(12))  # every row is in a micro-batch
    # why whole steps: those 8 rows lose 2 to the buffer's floor, without an error
    n, trained = _replay_buffer_trained_rows(args, one_rank_dp_group, balance_experiences(short, args)[0],
                                             monkeypatch)
    assert n == 8 and len(trained) == 6


@pytest.mark.parametrize("dp", [2, 3])
def test_drop_mode_remove_with_dynamic_batching_splits_evenly(tok, clusterer, tmp_path, monkeypatch, dp):
    from openrlhf.trainer.ppo_utils.experience import balance_experiences

    args = _args(dp=dp, train_micro=1, train_batch=dp * 2, dynamic=True)
    _, out = _remove_batch(tok, clusterer, tmp_path, monkeypatch, args)
    n = sum(e.sequences.shape[0] for e in out)
    shards = balance_experiences(out, args)
    assert len(shards) == dp and {e.sequences.shape[0] for e in shards} == {n // dp}
    assert (n // dp) % (args.train.batch_size // dp) == 0  # whole local train batches per rank


def test_group_with_mixed_uids_is_rejected(tok, clusterer, tmp_path):
    opts = OpenRLHFCareOptions(core={"strategy": "ttrl"})
    runner = CareRunner(opts, G, tok, str(tmp_path), clusterer=clusterer)
    maker = _maker(tok, _args(), runner)
    raw = _rollouts(tok)
    raw[1].labels = [json.dumps({"uid": "other", "answer": "3"})]
    exps = _after_forward(maker.split_rollout_samples(raw))
    with pytest.raises(ValueError, match="different uids"):
        runner.decide(exps, None)


def _repeat_first_prompt(tok, label=None):
    """Rollouts whose third group is a second copy of the first prompt (p0, gold 3), with the
    third prompt's answers (4, 4, 4, 1): what OpenRLHF's --data.prompt_probs blending makes."""
    raw = _rollouts(tok)
    for s in raw[2 * G:]:
        s.labels, s.prompts = [label or raw[0].labels[0]], list(raw[0].prompts)
    return raw


def test_prompt_repeated_in_one_batch_is_decided_per_group_and_bought_once(tok, clusterer,
                                                                          tmp_path):
    """repeated_uids='share' (the default): each copy's rewards come from its own responses (the
    gold answer's cluster id is looked up per group, not per uid), and the uid is bought once."""
    opts = OpenRLHFCareOptions(core={"strategy": "gt"})
    runner = CareRunner(opts, G, tok, str(tmp_path), clusterer=clusterer)
    maker = _maker(tok, _args(), runner)
    exps = _after_forward(maker.split_rollout_samples(_repeat_first_prompt(tok)))
    d = runner.decide(exps, None)
    assert (d.source == BOUGHT).all() and d.labels_bought == 3
    assert runner.controller.store.spent()[0] == 2  # p0 and p1
    assert d.rewards.tolist() == [GOLD_R[0], GOLD_R[1], [0.0] * G]  # no 3 among 4, 4, 4, 1
    assert int(d.gold_ids[2]) == -1 and int(d.gold_ids[0]) >= 0
    rew = _by_index(exps, "rewards")
    assert [float(rew[i]) for i in range(2 * G, 3 * G)] == [0.0] * G


def test_prompt_repeated_in_one_batch_is_a_clear_error_when_refused(tok, clusterer, tmp_path):
    """repeated_uids='error': the adapter names the uid, the groups and the causes; with 'share',
    copies whose labels differ are refused (one uid, one label in the store)."""
    for core, label, msg in (
            ({"repeated_uids": "error"}, None,
             r"uid 'p0' fills two groups .*groups 0 and 2.*prompt_probs"),
            ({}, make_label("p0", "4", "math"), r"uid 'p0' fills two groups .*different labels")):
        opts = OpenRLHFCareOptions(core={"strategy": "ttrl", **core})
        runner = CareRunner(opts, G, tok, str(tmp_path), clusterer=clusterer)
        maker = _maker(tok, _args(), runner)
        exps = _after_forward(maker.split_rollout_samples(_repeat_first_prompt(tok, label)))
        with pytest.raises(ValueError, match=msg):
            runner.decide(exps, None)
