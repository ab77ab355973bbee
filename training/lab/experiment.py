"""One GRPO run (one strategy, one seed, one budget) from the cached SFT checkpoint, logged per step.

Per RL step: draw B distinct prompts, sample G rollouts each, run the scoring forward (old
log-probs, lengths, hidden states), map responses to answer ids with care_ext.answers, and hand
all of it to the core's CareController, whose Decision gives the advantages (rewards x weights)
and which prompts stay in the batch. After the policy update the controller trains its
classifiers. The lab itself decides nothing; it only adds simulation-only monitors.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from care_ext.ops import cluster_stats

from .evaluate import arith_answer_ids, evaluate, make_eval_set
from .grpo import GRPOConfig, grpo_update, make_optimizer
from .rollout import sample_rollouts
from .sft import load_checkpoint
from .strategies import is_budgeted, make_controller
from .task import TaskConfig, decode_responses, encode_prompts, format_prompt, sample_distinct_problems, true_answers


def auc(score: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of ``score`` (float [N]) for the bool [N] labels ``positive``
    (ties count 1/2; NaN when one class is absent)."""
    pos, neg = score[positive].double(), score[~positive].double()
    if pos.numel() == 0 or neg.numel() == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one run.

    Attributes:
        method: strategy name.
        seed: seeds the prompt stream, the rollout sampling and the strategy's randomness.
        budget: fraction p of each step's prompts whose GT label may be bought.
        sft_path: the SFT checkpoint to start from.
        grpo: GRPO hyper-parameters.
        task: the task (must match the checkpoint's).
        eval_every: evaluate at step 0, every this many steps, and at the last step.
        eval_size: held-out problems; eval_samples: n of mean@n / maj@n.
        eval_seed: seed of the held-out set and of its sampling (shared by all runs).
    """

    method: str
    seed: int
    budget: float
    sft_path: str
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    eval_every: int = 20
    eval_size: int = 256
    eval_samples: int = 8
    eval_seed: int = 12345
    care: tuple[tuple[str, object], ...] = ()
    """CareConfig overrides as (field, value) pairs (empty = the core's defaults)."""

    @property
    def name(self) -> str:
        """Folder name: <method>-p<budget%>-s<seed>[-<field><value>...] (overrides appended)."""
        extra = "".join(f"-{k}{v}" for k, v in self.care)
        return f"{self.method}-p{round(self.budget * 100):02d}-s{self.seed}{extra}"

    def to_dict(self) -> dict:
        """Nested plain dict."""
        return asdict(self)


def run(spec: RunSpec, out_dir: Path | str, on_step: Callable[[int], None] | None = None) -> dict:
    """Train one run and write <out_dir>/<spec.name>/{steps.jsonl, evals.jsonl, result.json}.

    A finished run (result.json present with the same spec) is not repeated: its result is
    returned as is (this is what makes a preset resumable).

    Args:
        on_step: optional callback(step) after every RL step (progress bars).

    Returns:
        the result dict (spec, evals, summary).
    """
    torch.set_num_threads(1)
    folder = Path(out_dir) / spec.name
    result_path = folder / "result.json"
    if result_path.exists():
        done = json.loads(result_path.read_text())
        if done.get("spec") == json.loads(json.dumps(spec.to_dict())):
            if on_step is not None:
                for s in range(spec.grpo.steps):
                    on_step(s)
            return done
    folder.mkdir(parents=True, exist_ok=True)
    cfg, task = spec.grpo, spec.task
    model = load_checkpoint(spec.sft_path)
    opt = make_optimizer(model, cfg)
    evalset = make_eval_set(spec.eval_size, task, spec.eval_seed)
    prompt_gen = torch.Generator().manual_seed(1000 + spec.seed)
    sample_gen = torch.Generator().manual_seed(2000 + spec.seed)
    shuffle_gen = torch.Generator().manual_seed(4000 + spec.seed)
    gold_by_uid: dict[str, int] = {}
    ctrl = make_controller(spec.method, spec.budget, spec.seed, cfg.group_size,
                           model.cfg.d_model, cfg.max_new_tokens, gold_by_uid, dict(spec.care))
    evals, labels_total, t_start = [], 0, time.time()

    def do_eval(step: int) -> None:
        ev = evaluate(model, evalset, arith_answer_ids, spec.eval_samples, cfg.temperature,
                      cfg.max_new_tokens, spec.eval_seed)
        evals.append({"step": step, **ev})

    do_eval(0)
    g = cfg.group_size
    with open(folder / "steps.jsonl", "w") as log:
        for step in range(1, cfg.steps + 1):
            t0 = time.time()
            problems = sample_distinct_problems(cfg.prompts_per_step, task, prompt_gen)
            gold = true_answers(problems, task)
            uids = format_prompt(problems, task)
            gold_by_uid.update(zip(uids, gold.tolist()))
            ro = sample_rollouts(model, encode_prompts(problems, task), g, cfg.max_new_tokens,
                                 cfg.temperature, sample_gen)
            b, t_resp = len(problems), ro.responses.shape[1]
            flat = decode_responses(ro.responses, ro.lengths)
            texts = [flat[i * g:(i + 1) * g] for i in range(b)]
            ids, gold_ids = arith_answer_ids(texts, gold.tolist())  # gold_ids: monitors only
            t_dec = time.time()
            dec = ctrl.decide(uids, ids, lengths=ro.lengths.view(b, g), h_prompt=ro.h_prompt,
                              h_resp=ro.h_resp, logprobs=ro.old_logprobs.view(b, g, t_resp),
                              logprob_mask=ro.mask.view(b, g, t_resp), payloads=texts)
            t_dec = time.time() - t_dec
            upd = grpo_update(model, opt, ro, dec.advantages, dec.keep, cfg, shuffle_gen)
            t_cls = time.time()
            train_metrics = ctrl.update()
            t_cls = time.time() - t_cls
            labels_total += dec.labels_bought
            rec = {"step": step, "bought": dec.labels_bought, "labels_total": labels_total,
                   "kept": int(dec.keep.sum()), "loss": upd["loss"], "clip_frac": upd["clip_frac"],
                   "train_acc": float(((ids >= 0) & (ids == gold_ids[:, None])).float().mean()),
                   "decide_s": t_dec, "classifier_update_s": t_cls, "step_time": time.time() - t0}
            rec["pseudo_acc"] = dec.metrics.get("sim/label_acc", math.nan)
            if dec.reliability is not None:  # simulation-only monitor of Stage-I
                rank, _ = cluster_stats(ids)
                maj_ok = ((rank == 0) & (ids >= 0) & (ids == gold_ids[:, None])).any(1)
                rec["stage1_auc"] = auc(dec.reliability, maj_ok)
            rec.update({k: v for k, v in dec.metrics.items() if isinstance(v, (int, float))})
            rec.update({k: v for k, v in train_metrics.items() if isinstance(v, (int, float))})
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if step % spec.eval_every == 0 or step == cfg.steps:
                do_eval(step)
            if on_step is not None:
                on_step(step)
    result = {"spec": spec.to_dict(), "budgeted": is_budgeted(spec.method), "evals": evals,
              "labels_total": labels_total, "wall_s": time.time() - t_start}
    with open(folder / "evals.jsonl", "w") as f:
        for e in evals:
            f.write(json.dumps(e) + "\n")
    result_path.write_text(json.dumps(result, indent=1))
    return result
