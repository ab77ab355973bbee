"""The CARE trainers: OpenRLHF's ``PPOTrainer`` (sync/hybrid mode: the single controller, a
CPU-only Ray actor) and, for ``--train.async_enable``, its ``TrainingActor`` (the async mode's
experience maker and PPO driver), each owning the CARE state. Both get the same additions
(:class:`CareTrainerMixin`):

* ``__init__``: the stock trainer, then a :class:`~.runner.CareRunner` and the
  :class:`~.experience.CareExperienceMaker` in place of the stock maker.
* ``train_step``: the stock step (experience -> PPO update -> weight sync), then the classifier
  update (``CareController.update``) and the step's ``care/*`` metrics merged into the status
  dict that OpenRLHF logs to TensorBoard / W&B (``train/care/...``).
* ``save_logs_and_checkpoints`` and ``save_best_checkpoint``: with every OpenRLHF checkpoint,
  regular (``--ckpt.save_steps``, tag ``global_step{N}``) or best-metric (eval, tag
  ``best_global_step{N}``), the CARE state is saved to ``<state_dir>/care_state_{tag}.pt``; the
  files of checkpoints OpenRLHF has deleted go too (it evicts regular checkpoints by metric, then
  age, and keeps one best). The SQLite label store persists by itself.
* ``init_checkpoint_states``: on resume (``--ckpt.load_enable``) the CARE state of the checkpoint
  DeepSpeed loaded (the tag in ``<ckpt.path>/_actor/latest``, regular or best) is loaded; with
  no checkpoint yet (a crash before the first one) CARE continues the crashed attempt's run id
  (``<state_dir>/care_run_id.json``), so the steps it reruns keep their per-step label caps.

Async mode: the driver builds ``PPOTrainerAsync``, whose ``__init__`` (in its own Ray worker)
builds the generator and the ``TrainingActor`` from module attributes of
``openrlhf.trainer.ppo_trainer_async``. :class:`CarePPOTrainerAsyncImpl` points that worker's
``TrainingActor`` attribute at :data:`CareTrainingActor` before the stock ``__init__`` runs; the
generator (vLLM sampling, evaluation) stays stock. The policy forward that captures hidden states
runs in the training actor's ``make_experience``, so CARE sees the same inputs as in sync mode;
rollouts may be one policy version old (``--train.async_queue_size``), as for the stock trainer.
"""
from __future__ import annotations

import os
import warnings

from .version import check_openrlhf_version

check_openrlhf_version()

import ray  # noqa: E402
import openrlhf.trainer.ppo_trainer_async as _async_module  # noqa: E402
from openrlhf.trainer.ppo_trainer import PPOTrainer as _StockPPOTrainer  # noqa: E402

from .config import OpenRLHFCareOptions  # noqa: E402
from .experience import CareExperienceMaker  # noqa: E402
from .install import rewrap_actor, unwrap_actor  # noqa: E402
from .runner import CareRunner  # noqa: E402


_STOCK_TRAINER, _STOCK_TRAINER_OPTIONS = unwrap_actor(_StockPPOTrainer)
_STOCK_TRAINING_ACTOR, _STOCK_TRAINING_ACTOR_OPTIONS = unwrap_actor(_async_module.TrainingActor)
_STOCK_ASYNC_TRAINER, _STOCK_ASYNC_TRAINER_OPTIONS = unwrap_actor(_async_module.PPOTrainerAsync)


def _actor_ckpt_dir(ckpt_path) -> str:
    """OpenRLHF's DeepSpeed checkpoint folder of the policy (``PolicyModelActor``)."""
    return os.path.join(str(ckpt_path), "_actor")


def held_checkpoint_tags(ckpt_path) -> list[str] | None:
    """The checkpoint tags (sub-folders) OpenRLHF holds under ``<ckpt_path>/_actor``; None when
    that folder is not visible here (no DeepSpeed checkpoints, or not on this node's disk)."""
    d = _actor_ckpt_dir(ckpt_path)
    if not os.path.isdir(d):
        return None
    return [t for t in os.listdir(d) if os.path.isdir(os.path.join(d, t))]


def latest_checkpoint_tag(ckpt_path) -> str | None:
    """The tag DeepSpeed's ``latest`` file names: the checkpoint ``--ckpt.load_enable`` loads
    (``load_checkpoint(tag=None)``); None without that file."""
    path = os.path.join(_actor_ckpt_dir(ckpt_path), "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


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


class CareTrainerMixin:
    """The CARE additions to a ``BasePPOTrainer`` subclass (see the module docstring). Put it
    first in the bases: ``class X(CareTrainerMixin, StockTrainer)``."""

    def __init__(self, *args, **kwargs):
        options = OpenRLHFCareOptions.from_env()
        super().__init__(*args, **kwargs)
        attach_care(self, options)

    def train_step(self, rollout_samples, global_step):
        status, global_step = super().train_step(rollout_samples, global_step)
        status.update(self.care.after_policy_update())
        return status, global_step

    def save_logs_and_checkpoints(self, global_step, logs_dict=None, client_states=None):
        """The stock logs and regular checkpoint ``global_step{N}``, then CARE's state with it."""
        super().save_logs_and_checkpoints(global_step, logs_dict, client_states)
        if global_step % self.args.ckpt.save_steps == 0:
            self._save_care_state(global_step, f"global_step{global_step}")

    def save_best_checkpoint(self, eval_metrics, global_step, client_states=None):
        """The stock best-metric checkpoint ``best_global_step{N}``, then CARE's state with it.

        OpenRLHF saves it with DeepSpeed's ``save_latest``, so ``--ckpt.load_enable`` resumes
        from it when it is the newest; the stock method saved one iff the best value changed.
        """
        best = self.best_eval_metric_value
        super().save_best_checkpoint(eval_metrics, global_step, client_states)
        if self.best_eval_metric_value != best:
            self._save_care_state(global_step, f"best_global_step{global_step}")

    def _save_care_state(self, global_step, tag):
        """CARE's state as that of OpenRLHF checkpoint ``tag``; drop the states of checkpoints
        OpenRLHF no longer holds (it evicts regular ones by metric, not age, and keeps one best)."""
        held = held_checkpoint_tags(self.args.ckpt.path)
        self.care.save(global_step, keep=self.args.ckpt.max_num, tag=tag, keep_tags=held)

    def init_checkpoint_states(self):
        """The stock resume states, then the CARE state of the checkpoint DeepSpeed loaded; on a
        resume with no checkpoint yet (a crash before the first one), the crashed attempt's
        CARE run id (:meth:`~.runner.CareRunner.resume_without_state`)."""
        states = super().init_checkpoint_states()
        if states.get("global_step", 0) > 0:
            self.care.load(states["global_step"], tag=latest_checkpoint_tag(self.args.ckpt.path))
        elif getattr(self.args.ckpt, "load_enable", False):
            run = self.care.resume_without_state()
            if run is not None:
                warnings.warn(f"care_ext: resuming at global step 0 (no checkpoint yet): CARE "
                              f"continues run {run} of {self.care.state_dir}, so the steps it "
                              "reruns keep their label caps", RuntimeWarning)
        return states

    def care_info(self) -> dict:
        """What this trainer runs (class, options): for launch checks and tests."""
        return {"class": type(self).__name__, "options": self.care.options.to_json()}


class CarePPOTrainerImpl(CareTrainerMixin, _STOCK_TRAINER):
    """Stock ``PPOTrainer`` (sync/hybrid mode) + CARE."""


class CareTrainingActorImpl(CareTrainerMixin, _STOCK_TRAINING_ACTOR):
    """Stock async-mode ``TrainingActor`` + CARE."""


CarePPOTrainer = rewrap_actor(CarePPOTrainerImpl, _STOCK_TRAINER_OPTIONS)
"""The Ray actor class the launcher puts in place of ``PPOTrainer``."""

CareTrainingActor = rewrap_actor(CareTrainingActorImpl, _STOCK_TRAINING_ACTOR_OPTIONS)
"""The async training actor that :class:`CarePPOTrainerAsyncImpl` builds."""


class CarePPOTrainerAsyncImpl(_STOCK_ASYNC_TRAINER):
    """Stock ``PPOTrainerAsync`` whose training actor is :data:`CareTrainingActor`."""

    def __init__(self, *args, **kwargs):
        # This actor's own worker process: the stock __init__ reads the module attribute.
        _async_module.TrainingActor = CareTrainingActor
        super().__init__(*args, **kwargs)

    def care_info(self) -> dict:
        """This actor's class and its training actor's ``care_info`` (raises its init error)."""
        return {"class": type(self).__name__, "trainer": ray.get(self.trainer_actor.care_info.remote())}


CarePPOTrainerAsync = rewrap_actor(CarePPOTrainerAsyncImpl, _STOCK_ASYNC_TRAINER_OPTIONS)
"""The Ray actor class the launcher puts in place of ``PPOTrainerAsync``."""
