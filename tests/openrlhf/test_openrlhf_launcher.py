"""The launcher: --care.* parsing, stock-flag checks, and the CARE classes reaching Ray workers
of a local CPU Ray cluster (2 CPUs) with the job's --care.* options."""
import json
import os
import subprocess
import sys

import pytest

from care_ext.integrations.openrlhf.cli import check_stock_flags
from care_ext.integrations.openrlhf.config import OpenRLHFCareOptions, parse_care_args, split_care_argv

GRPO = ["--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "8",
        "--data.label_key", "label", "--reward.remote_url", "reward_func.py", "--algo.kl.use_loss"]


def test_split_and_parse_care_flags():
    care, rest = split_care_argv(["--actor.model_name_or_path", "m", "--care.strategy", "care",
                                  "--care.budget_frac=0.1", "--care.drop_mode", "remove", "--algo.kl.use_loss",
                                  "--care.class_weight_clip", "0.5,2", "--care.global_budget", "none"])
    assert rest == ["--actor.model_name_or_path", "m", "--algo.kl.use_loss"]
    o = parse_care_args(care)
    assert o.drop_mode == "remove"
    assert o.core == {"strategy": "care", "budget_frac": 0.1, "class_weight_clip": (0.5, 2.0), "global_budget": None}
    cfg = o.care_config(8)
    assert cfg.group_size == 8 and cfg.budget_frac == 0.1 and cfg.alpha == 0.25
    assert OpenRLHFCareOptions.from_json(o.to_json()) == OpenRLHFCareOptions.from_json(json.dumps(json.loads(o.to_json())))
    with pytest.raises(SystemExit):
        parse_care_args(["--care.no_such_flag", "1"])
    with pytest.raises(ValueError, match="group_size"):
        split_care_argv(["--care.group_size", "4"])
    with pytest.raises(ValueError):
        parse_care_args(["--care.drop_mode", "sometimes"])
    with pytest.raises(ValueError):
        parse_care_args(["--care.alpha", "1.5"])  # validated by the core config, before any actor starts


@pytest.mark.parametrize("extra,msg", [
    (["--algo.advantage.estimator", "gae"], "group estimator"),
    (["--rollout.n_samples_per_prompt", "1"], "G >= 2"),
])
def test_stock_flag_checks(extra, msg):
    with pytest.raises(SystemExit, match=msg):
        check_stock_flags(GRPO + extra, OpenRLHFCareOptions())
    assert check_stock_flags(GRPO, OpenRLHFCareOptions()) == []
    notes = check_stock_flags(GRPO[:-1] + ["--algo.kl.init_coef", "0.01", "--algo.dynamic_filtering_enable"],
                              OpenRLHFCareOptions())
    assert any("KL" in n for n in notes) and any("dynamic_filtering" in n for n in notes)


def test_kl_warning_covers_the_stock_default():
    """No --algo.kl.init_coef means OpenRLHF's default (0.01 in 0.11.2's train_ppo_ray.py, with
    --algo.kl.use_loss off): the KL penalty is in the reward, so the launcher warns."""
    import importlib.util
    import re

    no_kl_flags = GRPO[:-1]  # GRPO without --algo.kl.use_loss
    notes = check_stock_flags(no_kl_flags, OpenRLHFCareOptions())
    assert any("KL is in the reward" in n for n in notes)
    assert not any("KL" in n for n in check_stock_flags(no_kl_flags + ["--algo.kl.init_coef", "0"],
                                                        OpenRLHFCareOptions()))
    assert not any("KL" in n for n in check_stock_flags(GRPO, OpenRLHFCareOptions()))
    # the launcher's idea of the stock defaults is the installed parser's
    from care_ext.integrations.openrlhf.cli import STOCK_KL_INIT_COEF

    with open(importlib.util.find_spec("openrlhf.cli.train_ppo_ray").origin) as f:
        src = f.read()
    default = re.search(r'"--algo\.kl\.init_coef", type=float, default=([0-9.e-]+)', src)
    assert default and float(default.group(1)) == STOCK_KL_INIT_COEF > 0
    use_loss = re.search(r'"--algo\.kl\.use_loss", action="store_true", default=(\w+)', src)
    assert use_loss and use_loss.group(1) == "False"


def _without(argv, flag):
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def test_launch_without_a_reward_source_is_rejected():
    """No --reward.remote_url / --train.agent_func_path / --reward.model_name_or_path: OpenRLHF
    builds a reward-model actor group that never loads a model (train_ppo_ray.py), and the run
    would fail only after a whole generation round. The launcher stops before anything starts."""
    import importlib.util

    from care_ext.integrations.openrlhf.cli import main

    no_reward = _without(GRPO, "--reward.remote_url")
    with pytest.raises(SystemExit, match="--reward.remote_url"):
        check_stock_flags(no_reward, OpenRLHFCareOptions())
    with pytest.raises(SystemExit, match="reward_func.py"):
        main(no_reward + ["--care.strategy", "ttrl"], stock_module="no_such_module_is_ever_run")
    with pytest.raises(SystemExit, match="--reward.remote_url"):
        check_stock_flags(no_reward + ["--reward.remote_url="], OpenRLHFCareOptions())
    assert check_stock_flags(no_reward + ["--reward.remote_url=http://rm:5000/get_reward"],
                             OpenRLHFCareOptions()) == []
    assert check_stock_flags(no_reward + ["--train.agent_func_path", "agent.py"],
                             OpenRLHFCareOptions()) == []
    notes = check_stock_flags(no_reward + ["--reward.model_name_or_path", "rm"],
                              OpenRLHFCareOptions())
    assert len(notes) == 1 and "reward model" in notes[0]
    # the alternatives are the installed OpenRLHF's: a reward-model group unless remote_url is set,
    # which --train.agent_func_path sets to "agent"; the group loads a model only when one is named
    with open(importlib.util.find_spec("openrlhf.cli.train_ppo_ray").origin) as f:
        src = f.read()
    assert "if not args.reward.remote_url:\n        reward_model = RayActorGroup(" in src
    assert 'if args.train.agent_func_path:\n        args.reward.remote_url = "agent"' in src
    assert "if reward_model is not None and args.reward.model_name_or_path:" in src


def test_capture_off_with_a_learned_strategy_is_rejected_at_launch():
    """The CARE family decides on hidden states: --care.capture off with it would pass the launch
    and fail at the first step's decide(), after a whole generation round."""
    from care_ext.integrations.openrlhf.cli import main

    with pytest.raises(ValueError, match="--care.capture off, but --care.strategy care"):
        parse_care_args(["--care.capture", "off"])  # the default strategy is care
    with pytest.raises(ValueError, match="--care.capture off"):
        main(GRPO + ["--care.capture", "off"], stock_module="no_such_module_is_ever_run")
    assert parse_care_args(["--care.capture", "off", "--care.strategy", "ttrl"]).capture == "off"
    assert parse_care_args(["--care.capture", "on"]).needs_hidden_states()


def test_prompt_blending_is_noted_or_refused_at_launch():
    """--data.prompt_probs over several datasets: OpenRLHF's interleave_datasets(stopping_strategy=
    'all_exhausted') repeats rows of the smaller ones, so a prompt can fill two groups of one
    rollout batch: a note under repeated_uids='share', refused under 'error'. One dataset with
    probabilities, or several without, read each row once."""
    from datasets import Dataset, interleave_datasets

    small = Dataset.from_dict({"uid": ["a0", "a1"]})
    big = Dataset.from_dict({"uid": [f"b{i}" for i in range(8)]})
    blended = interleave_datasets([small, big], probabilities=[0.5, 0.5], seed=0,
                                  stopping_strategy="all_exhausted")["uid"]
    assert len(list(blended)) > len(set(blended))  # the stock blend repeats rows

    blend = ["--data.prompt_dataset", "a.jsonl,b.jsonl", "--data.prompt_probs", "0.5,0.5"]
    refuse = OpenRLHFCareOptions(core={"repeated_uids": "error"})
    with pytest.raises(SystemExit, match="--data.prompt_probs.*repeated_uids error"):
        check_stock_flags(GRPO + blend, refuse)
    notes = check_stock_flags(GRPO + blend, OpenRLHFCareOptions())  # 'share': a note
    assert len(notes) == 1 and "buys the prompt's label once" in notes[0]
    assert check_stock_flags(GRPO + blend[:2], refuse) == []
    one = ["--data.prompt_dataset", "a.jsonl", "--data.prompt_probs", "1.0"]
    assert check_stock_flags(GRPO + one, OpenRLHFCareOptions()) == []


def test_help_runs_the_stock_cli_through_runpy():
    r = subprocess.run([sys.executable, "-m", "care_ext.integrations.openrlhf", "--care.strategy", "ttrl", "--help"],
                       capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--rollout.n_samples_per_prompt" in r.stdout  # the stock parser's help
    r = subprocess.run([sys.executable, "-m", "care_ext.integrations.openrlhf", "--help-care"],
                       capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0 and "--care.drop_mode" in r.stdout and "--care.budget_frac" in r.stdout


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_launcher_installs_care_classes_in_ray_workers(tmp_path, mode):
    out = tmp_path / "result.json"
    code = ("from care_ext.integrations.openrlhf.cli import main; import sys; "
            "main(sys.argv[1:], stock_module='fake_train_ppo_ray')")
    env = dict(os.environ, RAY_DEDUP_LOGS="0")
    extra = ["--train.async_enable"] if mode == "async" else []
    r = subprocess.run([sys.executable, "-c", code, *GRPO, *extra, "--care.strategy", "care", "--care.alpha", "0.1",
                        "--care.feature_dtype", "bfloat16", "--out", str(out)],
                       capture_output=True, text=True, timeout=540, cwd=str(tmp_path), env=env)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads(out.read_text())
    assert res["driver_policy"] == "CarePolicyModelActorImpl"
    assert res["driver_trainer"] == ("CarePPOTrainerAsyncImpl" if mode == "async" else "CarePPOTrainerImpl")
    w = res["worker"]
    assert w["class"] == "CarePolicyModelActorImpl" and "PolicyModelActor" in w["mro"]
    assert w["capture"] is True  # the care strategy needs hidden states
    opts = OpenRLHFCareOptions.from_json(w["options"])  # the --care.* flags reached the worker
    assert opts.core == {"strategy": "care", "alpha": 0.1} and opts.feature_dtype == "bfloat16"
    # the trainer actor ran CARE's __init__ in its worker (the stock part then fails on bogus args);
    # in async mode that actor is the TrainingActor that PPOTrainerAsync built in its own worker
    err = res["trainer_error"]
    assert "care_ext/integrations/openrlhf/trainer.py" in err, err[-3000:]
    if mode == "async":  # got as far as loading the (bogus) model's tokenizer
        assert "CareTrainingActorImpl" in err and "nonexistent-model" in err


def test_import_care_ext_does_not_import_openrlhf():
    code = ("import sys, care_ext, care_ext.integrations.openrlhf, care_ext.integrations.openrlhf.cli, "
            "care_ext.integrations.openrlhf.capture, care_ext.integrations.openrlhf.runner; "
            "assert 'openrlhf' not in sys.modules, 'openrlhf imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr[-2000:]


def test_drop_mode_remove_flag_checks():
    remove = OpenRLHFCareOptions(drop_mode="remove")
    one_step = GRPO + ["--rollout.batch_size", "64", "--train.batch_size", "512", "--train.dynamic_batch_enable"]
    notes = check_stock_flags(one_step, remove)  # dynamic batching is accepted
    assert any("nothing can leave" in n for n in notes)
    assert not any("nothing can leave" in n for n in check_stock_flags(one_step, OpenRLHFCareOptions()))
    four_steps = GRPO + ["--rollout.batch_size", "64", "--train.batch_size", "128"]
    assert not any("nothing can leave" in n for n in check_stock_flags(four_steps, remove))


@pytest.mark.parametrize("task", ["math", "kk"])
def test_recipe_hands_the_launcher_absolute_paths_and_passing_flags(tmp_path, task):
    """training/openrlhf/grpo_care.sh, run with relative DATA_DIR and RUN: the launcher gets
    absolute data, checkpoint and CARE paths (under ``ray job submit`` the entrypoint does not run
    in the caller's directory), and the recipe's flags pass the launcher's checks without a
    warning. The launch itself (OpenRLHF on GPUs) is replaced by a ``python3`` on PATH that
    records its arguments when called with ``-m``; every other python call runs for real."""
    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "training", "openrlhf",
                          "grpo_care.sh")
    shim, argv_file = tmp_path / "bin", tmp_path / "argv.json"
    shim.mkdir()
    record = f"import json, sys; json.dump(sys.argv[1:], open({str(argv_file)!r}, 'w'))"
    (shim / "python3").write_text(
        f'#!/bin/sh\nif [ "$1" = "-m" ]; then shift 2; exec {sys.executable} -c "{record}" "$@"; fi\n'
        f'exec {sys.executable} "$@"\n')
    (shim / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    for f in shim.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}", MODEL="Qwen/Qwen3-4B-Base",
               TASK=task, DATA_DIR="data/openrlhf", RUN="runs/try")
    env.pop("RAY_ADDRESS", None)
    subprocess.run(["bash", recipe], env=env, cwd=tmp_path, check=True, capture_output=True)
    argv = json.loads(argv_file.read_text())
    value = {k: v for k, v in zip(argv, argv[1:]) if k.startswith("--")}
    for flag in ("--data.prompt_dataset", "--eval.dataset", "--ckpt.path", "--ckpt.output_dir",
                 "--care.label_store", "--care.state_dir"):
        assert os.path.isabs(value[flag]) and value[flag].startswith(str(tmp_path)), flag
    care, rest = split_care_argv(argv)
    assert check_stock_flags(rest, parse_care_args(care)) == []
