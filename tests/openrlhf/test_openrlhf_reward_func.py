"""The shipped ``--reward.remote_url`` file, loaded and called the way OpenRLHF 0.11.2 does it.

OpenRLHF's vLLM rollout actors build ``openrlhf.utils.agent.SingleTurnAgentExecutor(remote_url)``,
which loads a ``.py`` reward URL with ``importlib.util.spec_from_file_location("reward_func",
path)``: a top-level module without a package. The tests below build that real executor on the
shipped file and run its real ``execute`` on one rollout; only the vLLM engine (GPU-only) is a
stand-in that returns a fixed completion.
"""
import asyncio
import json
from types import SimpleNamespace as NS

from orl_testutil import word_tokenizer

import care_ext.integrations.openrlhf.reward_func as shipped


class _FixedCompletionEngine:
    """Stands in for the vLLM engine (GPU-only): ``generate`` returns the given token ids."""

    def __init__(self, token_ids):
        self.token_ids = list(token_ids)

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        out = NS(token_ids=self.token_ids, finish_reason="stop", logprobs=None)
        return NS(outputs=[out])


def _executor():
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    return SingleTurnAgentExecutor(shipped.__file__)  # what RolloutRayActor builds


def _rollout_reward(executor, tok, prompt, response, label):
    engine = _FixedCompletionEngine(tok.convert_tokens_to_ids(response.split()))
    params = NS(max_tokens=16, logprobs=None)
    out = asyncio.run(executor.execute(prompt, label, params, 64, tok, engine))
    return out["reward"]


def test_openrlhf_loads_the_reward_file_and_grades_a_rollout():
    ex = _executor()  # before the fix: ImportError (relative import in a package-less module)
    assert ex.reward_func.__module__ == "reward_func"
    tok = word_tokenizer(["question", "a", "?", "so", "\\boxed{3}", "\\boxed{4}"])
    label = json.dumps({"uid": "a", "answer": "3", "task": "math"})
    right = _rollout_reward(ex, tok, "question a ?", "so \\boxed{3}", label)
    wrong = _rollout_reward(ex, tok, "question a ?", "so \\boxed{4}", label)
    assert right is not None and float(right[0]) == 1.0
    assert wrong is not None and float(wrong[0]) == 0.0

