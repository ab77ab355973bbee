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

import pytest
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



KK_WORDS = ["puzzle", "so", "<answer>", "</answer>", "Zoey", "Oliver", "is", "a", "knight", "knave",
            ","]
KK_RIGHT = "so <answer> Zoey is a knight , Oliver is a knave </answer>"
KK_WRONG = "so <answer> Zoey is a knave , Oliver is a knave </answer>"


@pytest.mark.parametrize("task,right", [("kk", 1.0), ("auto", 0.0), (None, 0.0)])
def test_care_task_reaches_the_grader_in_the_rollout_actor(monkeypatch, task, right):
    """``--care.task kk`` forces the K&K reader on a label without ``task``, as in the trainer.

    The launcher puts the options in the environment of every Ray actor (``install``); a vLLM
    actor's executor grades with them. Without ``--care.task`` (or with ``auto``) the label's own
    task (default math) reads the answer, and the math reader finds no answer here.
    """
    from care_ext.integrations.openrlhf.config import ENV_VAR, OpenRLHFCareOptions

    if task is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, OpenRLHFCareOptions(task=task).to_json())
    ex = _executor()
    tok = word_tokenizer(KK_WORDS)
    label = json.dumps({"uid": "kk-1", "answer": [True, False], "names": ["Zoey", "Oliver"]})
    assert float(_rollout_reward(ex, tok, "puzzle", KK_RIGHT, label)[0]) == right
    assert float(_rollout_reward(ex, tok, "puzzle", KK_WRONG, label)[0]) == 0.0
    assert shipped.grade(KK_RIGHT, label, "puzzle") == right  # eval_vllm.py's entry point


def test_explicit_task_overrides_the_environment(monkeypatch):
    from care_ext.integrations.openrlhf.config import ENV_VAR, OpenRLHFCareOptions

    monkeypatch.setenv(ENV_VAR, OpenRLHFCareOptions(task="math").to_json())
    label = json.dumps({"uid": "kk-1", "answer": [True, False], "names": ["Zoey", "Oliver"]})
    assert shipped.grade(KK_RIGHT, label, "puzzle") == 0.0
    assert shipped.grade(KK_RIGHT, label, "puzzle", task="kk") == 1.0
