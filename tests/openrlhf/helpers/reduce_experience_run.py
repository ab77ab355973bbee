"""Driver of the Ray test of ``--care.worker_reduce``: a real ``RayActorGroup`` of two CARE policy
workers (tiny CPU models), the stock ``RemoteExperienceMaker.make_experience`` dispatching the
forwards through it, and CARE's experience maker fetching the captured features (and, when
reducing, sending the projection first and fetching the bought prompts' raw rows back).

Usage: ``python reduce_experience_run.py MODE OUT.json`` (MODE: off | first_layer). Writes each
step's decision and what crossed the wire."""
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # test_openrlhf_experience (the shared rollout fixtures)

import ray  # noqa: E402


def main(mode: str, out: str) -> None:
    from care_ext.answers import AnswerClusterer
    from care_ext.integrations.openrlhf.config import ENV_VAR, OpenRLHFCareOptions
    from care_ext.integrations.openrlhf.runner import CareRunner
    from openrlhf.trainer.ray.launcher import RayActorGroup
    from test_openrlhf_experience import G, WORDS, _args, _maker, _rollouts
    from orl_testutil import word_tokenizer
    from tiny_policy_actor import TinyCarePolicy

    opts = OpenRLHFCareOptions(worker_reduce=mode, core={"strategy": "care", "warmup_steps": 0, "alpha": 0.34,
                                                           "budget_frac": 0.34, "seed": 3})
    env = {ENV_VAR: opts.to_json(), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
             runtime_env={"env_vars": env})
    tok = word_tokenizer(WORDS)
    clusterer = AnswerClusterer(workers=0)
    try:
        group = RayActorGroup(2, 1, TinyCarePolicy, num_gpus_per_actor=0)  # two DP ranks, no GPU
        assert sorted(ray.get(group.async_run_method("care_test_setup"), timeout=300)) == [0, 1]
        args = _args()
        args.train.colocate_all = args.train.colocate_actor_ref = args.train.colocate_critic_reward = False
        runner = CareRunner(opts, G, tok, str(Path(out).parent / f"ckpt_{mode}"), clusterer=clusterer)
        maker = _maker(tok, args, runner)
        maker.capture = True
        maker.actor_model_group = group
        maker.initial_model_group = maker.critic_model_group = maker.reward_model_group = None
        wire = []
        real_fetcher = maker._raw_fetcher

        def counting_fetcher(owners):  # records what the trainer asks the workers for
            fetch = real_fetcher(owners)

            def f(prompt_pairs, resp_pairs):
                wire.append({"owners": owners, "prompt_pairs": [list(p) for p in prompt_pairs],
                             "resp_pairs": [list(p) for p in resp_pairs]})
                return fetch(prompt_pairs, resp_pairs)
            return f

        maker._raw_fetcher = counting_fetcher
        steps = []
        for s in range(3):
            exps = maker.split_rollout_samples(_rollouts(tok))
            n_wire = len(wire)
            exps = maker.make_experience(exps)
            exps = maker.compute_advantages_and_returns(exps)
            d = runner.last_decision
            mets = runner.after_policy_update()
            steps.append({"source": d.source.tolist(), "weight": d.weight.tolist(),
                          "rewards": d.rewards.tolist(), "reliability": d.reliability.tolist(),
                          "score": [None if x != x else x for x in d.score.tolist()],
                          "classifier": {k: v for k, v in mets.items() if "classifier" in k},
                          "fetches": wire[n_wire:],
                          "adv": [e.advantages.tolist() for e in exps]})
        Path(out).write_text(json.dumps({"steps": steps}))
    finally:
        clusterer.close()
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
