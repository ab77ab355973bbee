"""Stand-in for the *target* of the launcher in the Ray test (not an import stand-in): shaped like
``openrlhf.cli.train_ppo_ray`` - ``PolicyModelActor`` imported at module top, ``PPOTrainer`` (or,
with ``--train.async_enable``, ``PPOTrainerAsync as PPOTrainer``) inside ``train()``, ``ray.init``
with its own runtime_env - but it builds only one policy worker (no GPU) and the trainer on a
local CPU Ray cluster, and reports what they run."""
import json
import sys
from types import SimpleNamespace as NS

import ray
from openrlhf.trainer.ray.ppo_actor import PolicyModelActor


def _async_strategy():
    """The fields ``PPOTrainerAsync.__init__`` reads before it builds its actors (a real
    DeepspeedStrategy needs CUDA); the actors' own stock ``__init__`` then fail on the bogus model."""
    return NS(args=NS(eval=NS(steps=-1), ckpt=NS(save_steps=-1),
                      train=NS(async_queue_size=1, partial_rollout_enable=False),
                      data=NS(disable_fast_tokenizer=False)))


def train(out_path, async_enable):
    if async_enable:
        from openrlhf.trainer.ppo_trainer_async import PPOTrainerAsync as PPOTrainer
    else:
        from openrlhf.trainer.ppo_trainer import PPOTrainer

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        pol = PolicyModelActor.options(num_gpus=0, num_cpus=0).remote(1, 0, "127.0.0.1", 29555)
        info = ray.get(pol.care_info.remote(), timeout=180)
        result = {"driver_policy": PolicyModelActor.__ray_metadata__.modified_class.__name__,
                  "driver_trainer": PPOTrainer.__ray_metadata__.modified_class.__name__, "worker": info}
        strategy = _async_strategy() if async_enable else None
        tr = PPOTrainer.options(num_cpus=0).remote("/nonexistent-model", strategy, None, None, None, None, None)
        try:
            if async_enable:
                # the async trainer builds; its training actor's __init__ fails on the bogus model
                result["trainer_info"] = ray.get(tr.care_info.remote(), timeout=180)
            else:
                ray.get(tr.get_max_steps.remote(), timeout=180)
            trainer_error = ""
        except Exception as exc:  # noqa: BLE001 - the stock __init__ fails on the bogus arguments
            trainer_error = str(exc)
        result["trainer_error"] = trainer_error
    finally:
        ray.shutdown()
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    train(sys.argv[sys.argv.index("--out") + 1], "--train.async_enable" in sys.argv)
