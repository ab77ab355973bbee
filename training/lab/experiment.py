"""One GRPO run (one method, one seed, one budget) from the cached SFT checkpoint, logged per step."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from care_ext.ops import cluster_stats, group_advantage

from .evaluate import arith_answer_ids, evaluate, make_eval_set
from .grpo import GRPOConfig, grpo_update, make_optimizer
from .rollout import sample_rollouts
from .scaffold import scaffold_decide
from .strategies import is_budgeted
from .sft import load_checkpoint
from .task import TaskConfig, decode_responses, encode_prompts, sample_problems, true_answers


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

    @property
    def name(self) -> str:
        """Folder name: <method>-p<budget%>-s<seed>."""
        return f"{self.method}-p{round(self.budget * 100):02d}-s{self.seed}"

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
        if done.get("spec") == spec.to_dict():
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
    decide_gen = torch.Generator().manual_seed(3000 + spec.seed)
    shuffle_gen = torch.Generator().manual_seed(4000 + spec.seed)
    answer_ids = arith_answer_ids
    evals, labels_total, t_start = [], 0, time.time()

    def do_eval(step: int) -> None:
        ev = evaluate(model, evalset, answer_ids, spec.eval_samples, cfg.temperature,
                      cfg.max_new_tokens, spec.eval_seed)
        evals.append({"step": step, **ev})

    do_eval(0)
    with open(folder / "steps.jsonl", "w") as log:
        for step in range(1, cfg.steps + 1):
            t0 = time.time()
            problems = sample_problems(cfg.prompts_per_step, task, prompt_gen)
            gold = true_answers(problems, task)
            ro = sample_rollouts(model, encode_prompts(problems, task), cfg.group_size,
                                 cfg.max_new_tokens, cfg.temperature, sample_gen)
            flat = decode_responses(ro.responses, ro.lengths)
            g = cfg.group_size
            texts = [flat[i * g:(i + 1) * g] for i in range(len(problems))]
            ids, gold_ids = answer_ids(texts, gold.tolist())
            dec = scaffold_decide(spec.method, ids, gold_ids, spec.budget, decide_gen)
            adv = group_advantage(dec.rewards, cfg.adv_eps, cfg.adv_unbiased) * dec.weights[:, None]
            upd = grpo_update(model, opt, ro, adv, dec.keep, cfg, shuffle_gen)
            rank, _ = cluster_stats(ids)
            correct = (ids >= 0) & (ids == gold_ids[:, None])
            maj_ok = ((rank == 0) & correct).any(dim=1)
            n_bought = int(dec.bought.sum())
            labels_total += n_bought
            rec = {"step": step, "pseudo_acc": float(maj_ok.float().mean()),
                   "train_acc": float(correct.float().mean()),
                   "bought": n_bought, "labels_total": labels_total,
                   "bought_wrong_major": float((~maj_ok[dec.bought]).float().mean()) if n_bought else None,
                   "kept_frac": float(dec.keep.float().mean()),
                   "loss": upd["loss"], "clip_frac": upd["clip_frac"], "step_time": time.time() - t0}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            if step % spec.eval_every == 0 or step == cfg.steps:
                do_eval(step)
            if on_step is not None:
                on_step(step)
    result = {"spec": spec.to_dict(), "budgeted": is_budgeted(spec.method), "evals": evals, "labels_total": labels_total,
              "wall_s": time.time() - t_start}
    with open(folder / "evals.jsonl", "w") as f:
        for e in evals:
            f.write(json.dumps(e) + "\n")
    result_path.write_text(json.dumps(result, indent=1))
    return result
