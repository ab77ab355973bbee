"""The CARE trainer: OpenRLHF's ``PPOTrainer`` (the single controller, a CPU-only Ray actor) that
owns the CARE state.

* ``__init__``: the stock trainer, then a :class:`~.runner.CareRunner` and the
  :class:`~.experience.CareExperienceMaker` in place of the stock maker.
* ``train_step``: the stock step (experience -> PPO update -> weight sync), then the classifier
  update (``CareController.update``) and the step's ``care/*`` metrics merged into the status
  dict that OpenRLHF logs to TensorBoard / W&B (``train/care/...``).
* ``save_logs_and_checkpoints``: with every OpenRLHF checkpoint (``--ckpt.save_steps``) the CARE
  state is saved to ``<state_dir>/care_state_global_step{N}.pt`` (the newest ``--ckpt.max_num``
  kept); the SQLite label store persists by itself.
* ``init_checkpoint_states``: on resume (``--ckpt.load_enable``) the CARE state of the resumed
  step is loaded.
"""
from __future__ import annotations

from .version import check_openrlhf_version

check_openrlhf_version()

import ray  # noqa: E402
from openrlhf.trainer.ppo_trainer import PPOTrainer as _StockPPOTrainer  # noqa: E402

from .config import OpenRLHFCareOptions  # noqa: E402
from .experience import CareExperienceMaker  # noqa: E402
from .runner import CareRunner  # noqa: E402

_STOCK_TRAINER = getattr(_StockPPOTrainer, "__ray_metadata__").modified_class
_STOCK_TRAINER_OPTIONS = dict(getattr(_StockPPOTrainer, "_default_options", {}) or {})


def attach_care(trainer, options: OpenRLHFCareOptions, runner: CareRunner | None = None) -> CareRunner:
    """Give a built stock trainer its CARE runner and swap in the CARE experience maker.

    Args:
        trainer: a ``BasePPOTrainer`` after its ``__init__`` (has ``experience_maker``).
        options: the job's ``--care.*`` options.
        runner: an existing runner (tests), else one is built from ``trainer.args``.
    """
    args = trainer.args
    if runner is None:
        runner = CareRunner(options, args.rollout.n_samples_per_prompt, trainer.tokenizer, args.ckpt.path)
    old = trainer.experience_maker
    trainer.experience_maker = CareExperienceMaker(
        old.actor_model_group, old.critic_model_group, old.reward_model_group, old.initial_model_group,
        old.kl_ctl, old.strategy, old.tokenizer, care=runner, capture=options.needs_hidden_states())
    trainer.care = runner
    return runner


class CarePPOTrainerImpl(_STOCK_TRAINER):
    """Stock ``PPOTrainer`` + CARE (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        options = OpenRLHFCareOptions.from_env()
        super().__init__(*args, **kwargs)
        attach_care(self, options)

    def train_step(self, rollout_samples, global_step):
        status, global_step = super().train_step(rollout_samples, global_step)
        status.update(self.care.after_policy_update())
        return status, global_step

    def save_logs_and_checkpoints(self, global_step, logs_dict=None, client_states=None):
        super().save_logs_and_checkpoints(global_step, logs_dict, client_states)
        if global_step % self.args.ckpt.save_steps == 0:
            self.care.save(global_step, keep=self.args.ckpt.max_num)

    def init_checkpoint_states(self):
        states = super().init_checkpoint_states()
        if states.get("global_step", 0) > 0:
            self.care.load(states["global_step"])
        return states

    def care_info(self) -> dict:
        """What this trainer runs (class, options): for launch checks and tests."""
        return {"class": type(self).__name__, "options": self.care.options.to_json()}


CarePPOTrainer = ray.remote(**_STOCK_TRAINER_OPTIONS)(CarePPOTrainerImpl) \
    if _STOCK_TRAINER_OPTIONS else ray.remote(CarePPOTrainerImpl)
"""The Ray actor class the launcher puts in place of ``PPOTrainer``."""
