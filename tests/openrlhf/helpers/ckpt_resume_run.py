"""Run by test_openrlhf_state.py in its own process (torch.distributed, DeepSpeed and Ray stay
out of the pytest process): OpenRLHF 0.11.2's real checkpoint path on the CPU, then a resume.

Real: the CARE trainer on ``BasePPOTrainer.__init__``, its ``save_logs_and_checkpoints`` /
``save_best_checkpoint`` / ``init_checkpoint_states``; ``PolicyModelActor.save_checkpoint`` and
``get_checkpoint_states``; ``DeepspeedStrategy.save_ckpt`` (eviction by metric, one best kept,
DeepSpeed's ``latest``) and ``load_ckpt`` on a real one-rank DeepSpeedEngine (tiny Linear). The
actor group is this process's one policy worker, called the way ``RayActorGroup.async_run_method``
calls it (Ray object refs). CPU-only change: OpenRLHF's ``torch_dist_barrier_and_cuda_sync`` runs
its barrier without ``torch.cuda.synchronize()``, which has nothing to wait for without CUDA and
raises on a CPU build of torch.

Usage: ``python ckpt_resume_run.py OUT.json WORKDIR``. ``training`` lists, per global step, what
the trainer did; ``controller.step`` is set to the global step before each step's saves, so a
resumed state shows which checkpoint's CARE state it loaded.
"""
import json
import os
import socket
import sys
from types import SimpleNamespace as NS


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0", DS_ACCELERATOR="cpu")

import deepspeed
import openrlhf.trainer.ray.ppo_actor as ppo_actor_module
import openrlhf.utils.deepspeed.deepspeed as ds_module
import ray
import torch
from openrlhf.trainer.ppo_trainer import BasePPOTrainer
from openrlhf.utils.deepspeed import DeepspeedStrategy

from care_ext.integrations.openrlhf import trainer as T
from care_ext.integrations.openrlhf.config import OpenRLHFCareOptions
from care_ext.integrations.openrlhf.install import unwrap_actor
from care_ext.integrations.openrlhf.runner import CareRunner


def _barrier_only():
    torch.distributed.barrier()


ds_module.torch_dist_barrier_and_cuda_sync = _barrier_only
ppo_actor_module.torch_dist_barrier_and_cuda_sync = _barrier_only
PolicyWorker, _ = unwrap_actor(ppo_actor_module.PolicyModelActor)


def _args(ckpt_path, save_steps, max_num):
    return NS(ckpt=NS(path=ckpt_path, save_steps=save_steps, max_num=max_num, max_mem=1000,
                      load_enable=True, best_metric_key="", disable_ds=False, save_hf=False),
              logger=NS(logging_steps=1, wandb=NS(key=None), tensorboard_dir=None),
              algo=NS(kl=NS(target=None, init_coef=0.0, horizon=10000),
                      advantage=NS(estimator="group_norm")),
              ds=NS(param_dtype="bf16"), train=NS(dynamic_batch_enable=False))


def _engine():
    model = torch.nn.Linear(4, 4)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(),
        config={"train_micro_batch_size_per_gpu": 1,
                "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    return engine


class OneWorkerGroup:
    """The policy actor group with one worker living in this process."""

    def __init__(self, worker):
        self.worker = worker

    def async_run_method(self, method_name, *args, **kwargs):
        return [ray.put(getattr(self.worker, method_name)(*args, **kwargs))]


def _worker(args, load):
    """A policy worker as ``PolicyModelActor.init_model_from_pretrained`` leaves it (DeepSpeed
    engine; on ``--ckpt.load_enable`` the checkpoint loaded through ``strategy.load_ckpt``)."""
    w = object.__new__(PolicyWorker)
    w.strategy = DeepspeedStrategy(args=args)
    w.actor = NS(model=_engine())
    w.disable_ds_ckpt, w.save_hf_ckpt = False, False
    w.checkpoint_states = {}
    ckpt = os.path.join(args.ckpt.path, "_actor")
    if load and os.path.exists(ckpt):
        _, w.checkpoint_states = w.strategy.load_ckpt(w.actor.model, ckpt)
    return w


def _trainer(args, load, cls=T.CarePPOTrainerImpl):
    t = object.__new__(cls)
    worker = _worker(args, load)
    BasePPOTrainer.__init__(t, worker.strategy, OneWorkerGroup(worker), None, None, None, None,
                            None)
    opts = OpenRLHFCareOptions(core={"strategy": "ttrl"})
    t.care = CareRunner(opts, 4, tokenizer=None, ckpt_path=args.ckpt.path,
                        clusterer=NS(close=lambda: None))
    return t


def run(ckpt_path, save_steps, eval_steps, max_num, metrics, latest=None, eval_lag=0):
    """Train ``len(metrics)`` steps in ``PPOTrainer.fit``'s order (regular save, then eval and
    best save every ``eval_steps``), optionally point DeepSpeed's ``latest`` at another kept
    checkpoint (a roll-back), then resume in a fresh trainer.

    ``eval_lag`` > 0: async mode's order (``TrainingActor.fit``): the eval of step ``e`` arrives
    after training step ``e + eval_lag``; ``save_best_checkpoint`` gets ``e`` (the tag) and the
    client states of the current step.
    """
    args = _args(ckpt_path, save_steps, max_num)
    cls = T.CareTrainingActorImpl if eval_lag else T.CarePPOTrainerImpl
    t = _trainer(args, load=False, cls=cls)
    for gs in range(1, len(metrics) + 1):
        t.care.controller.step = gs
        cs = {"episode": 0, "global_step": gs, "total_consumed_prompts": gs,
              "data_loader_state_dict": {}}
        t.save_logs_and_checkpoints(gs, {}, cs)
        e = gs - eval_lag
        if e >= 1 and e % eval_steps == 0:
            t.save_best_checkpoint({"eval_math_pass1": metrics[e - 1]}, e, dict(cs))
    t.care.close()
    actor_dir = os.path.join(ckpt_path, "_actor")
    if latest is not None:
        with open(os.path.join(actor_dir, "latest"), "w") as f:
            f.write(latest)
    with open(os.path.join(actor_dir, "latest")) as f:
        ds_latest = f.read().strip()
    out = {"ds_tags": sorted(d for d in os.listdir(actor_dir)
                             if os.path.isdir(os.path.join(actor_dir, d))),
           "latest": ds_latest,
           "care_files": sorted(p.name for p in t.care.state_dir.glob("care_state_*.pt"))}
    t2 = _trainer(args, load=True, cls=cls)
    try:
        states = t2.init_checkpoint_states()
        out["resume"] = {"global_step": states["global_step"], "care_step": t2.care.controller.step}
    except FileNotFoundError as e:
        out["resume"] = {"error": str(e)}
    t2.care.close()
    return out


def main(out_path, workdir):
    ray.init(num_cpus=1, include_dashboard=False, object_store_memory=100 * 1024 * 1024)
    try:
        res = {
            # eval every 10 steps with an improving metric, regular checkpoints every 20: the
            # newest checkpoint (DeepSpeed's latest) is best_global_step30
            "best_is_latest": run(os.path.join(workdir, "a"), save_steps=20, eval_steps=10,
                                  max_num=3, metrics=[0.1 * (s // 10) for s in range(1, 31)]),
            # --ckpt.save_steps -1 (no regular checkpoints) with eval: only best ones
            "only_best": run(os.path.join(workdir, "b"), save_steps=float("inf"), eval_steps=5,
                             max_num=3, metrics=[0.5] * 10),
            # regular checkpoints every step, eval every step, --ckpt.max_num 2: OpenRLHF evicts
            # by the metric stored with each checkpoint (the previous eval's), so it keeps
            # global_step2 (0.9) and deletes global_step3; roll back to global_step2
            "evicted_by_metric": run(os.path.join(workdir, "c"), save_steps=1, eval_steps=1,
                                     max_num=2, metrics=[0.9, 0.1, 0.2, 0.3],
                                     latest="global_step2"),
            # async mode, no regular checkpoints: the eval of step 4 arrives after step 5, so
            # best_global_step4 holds the state after step 5 (client global_step 5)
            "async_eval_lags": run(os.path.join(workdir, "d"), save_steps=float("inf"),
                                   eval_steps=2, max_num=3, metrics=[0.1, 0.2, 0.3, 0.4, 0.5],
                                   eval_lag=1),
        }
    finally:
        ray.shutdown()
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
