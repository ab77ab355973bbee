"""The launcher: ``python -m care_ext.integrations.openrlhf <stock train_ppo_ray flags> --care.*``
(console script ``care-openrlhf``).

1. Split ``--care.*`` from the stock flags and parse them (:mod:`.config`); ``--help-care`` lists them.
2. Check the pinned OpenRLHF version and the stock flags CARE depends on (a group advantage
   estimator with G > 1, ...).
3. :func:`.install.install` the CARE classes and route the options to the Ray actors.
4. Run ``openrlhf.cli.train_ppo_ray`` as ``__main__`` with the stock flags (``runpy``), exactly as
   ``python -m openrlhf.cli.train_ppo_ray`` would.
"""
from __future__ import annotations

import runpy
import sys
import warnings

from care_ext.config import CareConfig

from .config import OpenRLHFCareOptions, care_argument_parser, parse_care_args, split_care_argv

STOCK_MODULE = "openrlhf.cli.train_ppo_ray"
GROUP_ESTIMATORS = ("group_norm", "dr_grpo", "rloo", "reinforce_baseline")
REWARD_SOURCE_FLAGS = ("--reward.remote_url", "--train.agent_func_path",
                       "--reward.model_name_or_path")
"""Where OpenRLHF 0.11.2 takes rollout rewards from (train_ppo_ray.py): a reward function file or
URL, an agent (sets ``remote_url`` to ``agent``), or a reward model. With none of them it still
builds a reward-model actor group, never loads a model into it, and fails at the first step."""
STOCK_KL_INIT_COEF = 0.01
"""OpenRLHF 0.11.2's default ``--algo.kl.init_coef`` (train_ppo_ray.py); ``--algo.kl.use_loss``
defaults to off, so a launch without either flag puts the KL penalty in the reward."""


def _flag_value(argv: list[str], name: str):
    """Last value of ``--name v`` / ``--name=v`` in argv, True for a bare flag, None if absent."""
    val = None
    for i, a in enumerate(argv):
        if a == name:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            val = nxt if nxt is not None and not nxt.startswith("--") else True
        elif a.startswith(name + "="):
            val = a.split("=", 1)[1]
    return val


def check_stock_flags(argv: list[str], options: OpenRLHFCareOptions) -> list[str]:
    """Reject stock-flag combinations CARE cannot run with; return warnings for risky ones.

    Raises:
        SystemExit: with a message naming the flag.
    """
    est = _flag_value(argv, "--algo.advantage.estimator") or "gae"
    if est not in GROUP_ESTIMATORS:
        raise SystemExit(f"CARE needs a group estimator: --algo.advantage.estimator one of {GROUP_ESTIMATORS} "
                         f"(got {est!r}; OpenRLHF's default is gae)")
    g = _flag_value(argv, "--rollout.n_samples_per_prompt")
    if g is None or int(g) < 2:
        raise SystemExit("CARE needs --rollout.n_samples_per_prompt G >= 2 (the rollouts of one prompt)")
    reward_sources = [f for f in REWARD_SOURCE_FLAGS
                      if _flag_value(argv, f) not in (None, True, "")]
    if not reward_sources:
        raise SystemExit(
            "CARE needs rollout rewards from OpenRLHF: pass --reward.remote_url "
            "care_ext/integrations/openrlhf/reward_func.py (python -c \"import "
            "care_ext.integrations.openrlhf.reward_func as m; print(m.__file__)\"), or "
            "--train.agent_func_path / --reward.model_name_or_path. Without any of them OpenRLHF "
            "builds a reward-model actor that never loads a model, and the run fails after its "
            "first generation round")
    datasets = _flag_value(argv, "--data.prompt_dataset")
    blended = (_flag_value(argv, "--data.prompt_probs") not in (None, True)
               and isinstance(datasets, str) and "," in datasets)
    if blended and options.core.get("repeated_uids", CareConfig.repeated_uids) == "error":
        raise SystemExit(
            "CARE cannot take --data.prompt_probs with several --data.prompt_dataset under "
            "--care.repeated_uids error: OpenRLHF blends them with interleave_datasets("
            "stopping_strategy='all_exhausted'), which repeats rows of the smaller datasets, and "
            "two copies of one prompt in a rollout batch stop the step. Use --care.repeated_uids "
            "share (the default: the copies are decided apart and bought once), de-duplicate the "
            "prompts into one file, or list the datasets without --data.prompt_probs")
    notes = []
    if reward_sources == ["--reward.model_name_or_path"]:
        notes.append("rewards from a reward model (--reward.model_name_or_path): CARE overwrites "
                     "them, so the reward model only costs a forward pass; --reward.remote_url "
                     "with care_ext's reward_func.py is cheaper (and OpenRLHF's --eval.dataset "
                     "requires it)")
    if _flag_value(argv, "--algo.dynamic_filtering_enable"):
        notes.append("--algo.dynamic_filtering_enable filters prompts on the reward function's score "
                      "before CARE sees them (it reads gold labels and removes prompts CARE never decides)")
    kl = _flag_value(argv, "--algo.kl.init_coef")
    kl = STOCK_KL_INIT_COEF if kl in (None, True) else float(kl)
    if kl > 0 and not _flag_value(argv, "--algo.kl.use_loss"):
        notes.append("KL is in the reward (--algo.kl.use_loss off): CARE's prompt weights scale the KL "
                     "penalty too; use --algo.kl.use_loss for exact weights")
    if options.drop_mode == "remove":
        rb, tb = _flag_value(argv, "--rollout.batch_size"), _flag_value(argv, "--train.batch_size")
        if rb not in (None, True) and tb not in (None, True) and int(tb) >= int(rb) * int(g):
            notes.append(f"--care.drop_mode remove keeps whole optimizer steps: with --train.batch_size {tb} >= "
                         f"the rollout's {int(rb) * int(g)} samples nothing can leave the batch (dropped rows "
                         "stay as zero-advantage filler); use a smaller --train.batch_size")
    if blended:
        notes.append("--data.prompt_probs over several datasets repeats rows of the smaller ones "
                     "(interleave_datasets, stopping_strategy='all_exhausted'): a prompt may fill "
                     "several groups of one rollout batch; CARE decides each group on its own "
                     "rollouts and buys the prompt's label once (--care.repeated_uids share)")
    if not _flag_value(argv, "--data.label_key"):
        notes.append("no --data.label_key: prompts get hash uids and no gold answer (the gold oracle "
                     "then fails and those prompts are dropped)")
    return notes


def main(argv: list[str] | None = None, stock_module: str = STOCK_MODULE) -> None:
    """Entry point of ``care-openrlhf`` / ``python -m care_ext.integrations.openrlhf``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help-care" in argv:
        care_argument_parser().print_help()
        return
    care_argv, stock_argv = split_care_argv(argv)
    options = parse_care_args(care_argv)
    if "-h" not in stock_argv and "--help" not in stock_argv:
        for note in check_stock_flags(stock_argv, options):
            warnings.warn("care_ext: " + note, RuntimeWarning, stacklevel=2)
    from .install import install

    install(options)
    sys.argv = [stock_module] + stock_argv
    runpy.run_module(stock_module, run_name="__main__", alter_sys=True)
