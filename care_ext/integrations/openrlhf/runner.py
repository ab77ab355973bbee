"""The CARE state of one OpenRLHF run and the per-step call into the core.

:class:`CareRunner` lives in the trainer actor (OpenRLHF's single controller, no GPU). It owns the
:class:`care_ext.step.CareController` (classifiers, optimisers, replay, RNG), the label store, the
oracle and the answer clusterer, and turns one step's experiences into a
:class:`care_ext.decision.Decision`:

1. regroup the rows of every micro-batch by prompt: row ``i`` of the rollout belongs to prompt
   ``i // G`` at position ``i % G`` (``Experience.index``; micro-batches cut across groups);
2. decode each response and read its answer, cluster per prompt -> answer ids int64 [B, G];
3. with hidden states: ``h_prompt`` [B, H] (row 0 of the group; the prompt tokens are the same for
   all G) and ``h_resp`` [B, G, H];
4. ``controller.decide`` -> rewards [B, G] and weights [B].

It only duck-types OpenRLHF's ``Experience`` (``sequences``, ``attention_mask``, ``action_mask``,
``index``, ``prompts``, ``labels``), so it runs without Ray or GPUs.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from care_ext.answers import AnswerClusterer
from care_ext.decision import SOURCE_NAMES
from care_ext.labels import CallableOracle, GoldOracle, LabelStore
from care_ext.projection import ProjectedHidden
from care_ext.step import CareController

from .capture import CapturedFeatures, feature_positions, sequence_checksum
from .config import OpenRLHFCareOptions
from .labels import PromptLabel, parse_label

_STATE_FILE = re.compile(r"care_state_((?:best_)?global_step(\d+))\.pt")
"""A CARE state file's name: group 1 the OpenRLHF checkpoint tag, group 2 its step."""
RUN_ID_FILE = "care_run_id.json"
"""In the state dir: the run id of the controller that decides there, written before its first
purchase (see :meth:`CareRunner.resume_without_state`)."""


@dataclass
class StepBatch:
    """One step regrouped by prompt (B prompts, G rollouts).

    Attributes:
        where: list of B lists of G ``(experience number, row)`` pairs.
        labels: B parsed labels; prompts: B prompt texts; responses: B x G decoded responses.
        lengths: float32 [B, G] response lengths in tokens.
        h_prompt: [B, H] or None; h_resp: [B, G, H] or None.
    """

    where: list
    labels: list
    prompts: list
    responses: list
    lengths: Tensor
    h_prompt: Tensor | None
    h_resp: Tensor | None


def regroup(experiences: Sequence[Any], group_size: int, tokenizer, task: str = "auto",
            features: Sequence[CapturedFeatures] | None = None,
            repeated_uids: str = "share") -> StepBatch:
    """Regroup a step's micro-batches by prompt (see the module docstring).

    Args:
        experiences: OpenRLHF Experiences after ``make_experience`` (``index`` set per row).
        group_size: G (``--rollout.n_samples_per_prompt``).
        tokenizer: decodes the response tokens (``batch_decode``, special tokens skipped).
        task: ``--care.task``.
        features: one :class:`CapturedFeatures` per experience, in order, or None.
        repeated_uids: ``CareConfig.repeated_uids``. 'share': one uid may fill several groups
            (OpenRLHF's ``--data.prompt_probs`` blending repeats prompts), whose labels must then
            agree; 'error': a uid in two groups raises.

    Raises:
        ValueError: a prompt without exactly G rows, rows of one group with different uids, one
            uid in two groups with different labels (or at all, with ``repeated_uids='error'``),
            features that do not belong to these sequences.
    """
    G = group_size
    if features is not None and len(features) != len(experiences):
        raise ValueError(f"{len(features)} captured feature blocks for {len(experiences)} micro-batches")
    slots: dict[int, list] = {}
    token_rows, h_p, h_r = {}, {}, {}
    for k, e in enumerate(experiences):
        n = e.sequences.shape[0]
        if e.index is None or len(e.index) != n:
            raise ValueError(f"experience {k} has no per-row index (split_rollout_samples sets it)")
        p_prompt, p_resp = feature_positions(e.action_mask, e.attention_mask)
        if features is not None:
            f = features[k]
            if f.h_prompt.shape[0] != n or not torch.equal(f.checksum, sequence_checksum(e.sequences, e.attention_mask)):
                raise ValueError(f"captured features of micro-batch {k} do not match its sequences "
                                 "(hand-over out of order?)")
        for r in range(n):
            idx = int(e.index[r])
            g, pos = divmod(idx, G)
            slots.setdefault(g, [None] * G)
            if slots[g][pos] is not None:
                raise ValueError(f"rollout index {idx} appears twice")
            slots[g][pos] = (k, r)
            has_resp = bool(e.action_mask[r].any())
            token_rows[(k, r)] = e.sequences[r, int(p_prompt[r]) + 1: int(p_resp[r]) + 1].tolist() if has_resp else []
            if features is not None:
                h_p[(k, r)], h_r[(k, r)] = features[k].h_prompt[r], features[k].h_resp[r]
    groups = sorted(slots)
    where, labels, prompts = [], [], []
    for g in groups:
        if any(s is None for s in slots[g]):
            raise ValueError(f"prompt group {g} does not have all G = {G} rollouts in this step")
        where.append(slots[g])
        k0, r0 = slots[g][0]
        e0 = experiences[k0]
        lab = parse_label(e0.labels[r0] if e0.labels else "", e0.prompts[r0] if e0.prompts else "", task)
        for (k, r) in slots[g][1:]:
            other = parse_label(experiences[k].labels[r] if experiences[k].labels else "",
                                experiences[k].prompts[r] if experiences[k].prompts else "", task)
            if other.uid != lab.uid:
                raise ValueError(f"rows of prompt group {g} carry different uids ({lab.uid!r}, {other.uid!r})")
        labels.append(lab)
        prompts.append(e0.prompts[r0] if e0.prompts else "")
    _check_repeated_uids(groups, labels, repeated_uids)
    flat = [kr for w in where for kr in w]
    texts = tokenizer.batch_decode([token_rows[kr] for kr in flat], skip_special_tokens=True) if flat else []
    responses = [texts[i * G:(i + 1) * G] for i in range(len(where))]
    lengths = torch.tensor([[float(experiences[k].action_mask[r].sum()) for (k, r) in w] for w in where],
                           dtype=torch.float32).reshape(len(where), G)
    hp = hr = None
    if features is not None and where:
        hp = torch.stack([h_p[w[0]] for w in where])
        hr = torch.stack([torch.stack([h_r[kr] for kr in w]) for w in where])
    return StepBatch(where, labels, prompts, responses, lengths, hp, hr)


def _check_repeated_uids(groups: list[int], labels: list[PromptLabel], mode: str) -> None:
    """Raise a ValueError naming the uid and the groups when one prompt uid fills two groups of
    a batch and ``mode`` is 'error', or, with 'share', when the two carry different labels
    (the label store keys a label by uid: two prompts under one uid would share a purchase).
    """
    first: dict[str, tuple[int, PromptLabel]] = {}
    for g, lab in zip(groups, labels):
        if lab.uid not in first:
            first[lab.uid] = (g, lab)
            continue
        g0, lab0 = first[lab.uid]
        where = (f"prompt uid {lab.uid!r} fills two groups of this rollout batch (rollout groups "
                 f"{g0} and {g})")
        if mode == "error":
            raise ValueError(
                f"{where}, and --care.repeated_uids is 'error'. Repeats come from "
                "--data.prompt_probs blending (interleave_datasets with stopping_strategy="
                "'all_exhausted' repeats rows of the smaller datasets) or repeated rows / uids in "
                "the prompt data: de-duplicate the data, or use --care.repeated_uids share "
                "(docs/openrlhf.md)")
        if (lab.answer, lab.task, lab.names) != (lab0.answer, lab0.task, lab0.names):
            raise ValueError(
                f"{where} with different labels ({lab0.answer!r} / {lab.answer!r}, tasks "
                f"{lab0.task!r} / {lab.task!r}): one uid must name one prompt, since the label "
                "store pays for and keeps a label per uid. Give the prompts distinct uids")


def answer_ids_by_task(clusterer: AnswerClusterer, batch: StepBatch, with_gold: bool) -> tuple[Tensor, Tensor]:
    """Answer ids int64 [B, G] (and gold ids int64 [B], -1 without gold) for a mixed-task batch."""
    B, G = len(batch.where), batch.lengths.shape[1]
    ids = torch.full((B, G), -1, dtype=torch.long)
    gold = torch.full((B,), -1, dtype=torch.long)
    by_task: dict[str, list[int]] = {}
    for i, lab in enumerate(batch.labels):
        by_task.setdefault(lab.task, []).append(i)
    for task, rows in by_task.items():
        ctx = [batch.labels[i].context() for i in rows]
        gl = [batch.labels[i].answer for i in rows] if with_gold else None
        t_ids, t_gold = clusterer([batch.responses[i] for i in rows], task, gl,
                                  contexts=ctx if any(c is not None for c in ctx) else None)
        ids[rows] = t_ids
        gold[rows] = t_gold
    return ids, gold


def _group_fetcher(where: list, fetch_raw, G: int):
    """``ProjectedHidden.fetch_raw`` over prompt rows from a fetcher over ``(experience, row)``
    pairs: h_prompt of the group's row 0 (as :func:`regroup` takes it), h_resp of all G."""

    def fetch(rows):
        hp, hr = fetch_raw([where[b][0] for b in rows], [kr for b in rows for kr in where[b]])
        return hp, hr.reshape(len(rows), G, -1)

    return fetch


def _load_callable(spec: str):
    """``module:function`` -> the function."""
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise ValueError(f"--care.oracle callable must be 'callable:module:function', got 'callable:{spec}'")
    return getattr(importlib.import_module(mod), fn)


class CareRunner:
    """The CARE side of an OpenRLHF run (lives in the trainer actor).

    Args:
        options: the adapter options (``--care.*``).
        group_size: G (``--rollout.n_samples_per_prompt``).
        tokenizer: the trainer's tokenizer (decodes responses).
        ckpt_path: OpenRLHF's ``--ckpt.path`` (default home of the label store and CARE state).
        clusterer: an :class:`AnswerClusterer` to use (default: one with ``answer_workers``).
    """

    def __init__(self, options: OpenRLHFCareOptions, group_size: int, tokenizer, ckpt_path: str,
                 clusterer: AnswerClusterer | None = None) -> None:
        self.options = options
        self.G = int(group_size)
        self.tokenizer = tokenizer
        home = Path(ckpt_path) / "care"
        self.state_dir = Path(options.state_dir) if options.state_dir else home
        store_path = Path(options.label_store) if options.label_store else home / "labels.sqlite"
        store_path.parent.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config = options.care_config(self.G)
        self._gold_by_uid: dict[str, Any] = {}
        self._gold_id_cache: dict[tuple, int] = {}
        if options.oracle == "gold":
            oracle = GoldOracle(lambda uid, payload: self._gold_by_uid[uid])
        else:
            oracle = CallableOracle(_load_callable(options.oracle[len("callable:"):]),
                                    retries=options.oracle_retries, timeout_s=options.oracle_timeout_s)
        self.clusterer = clusterer or AnswerClusterer(workers=options.answer_workers)
        self.controller = CareController(self.config, oracle, LabelStore(store_path), self._resolve)
        self._recorded_run_id: str | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_decision = None

    # -- labels ----------------------------------------------------------------------------------
    def _resolve(self, label: Any, payload: dict) -> int:
        """Gold answer -> id of its cluster among the responses in ``payload`` (-1: none).

        Cached per (uid, label, responses): the rows of a repeated uid carry other responses,
        so other answer ids."""
        key = (payload["uid"], str(label), tuple(payload["responses"]))
        if key not in self._gold_id_cache:
            lab = PromptLabel(payload["uid"], label, payload["task"], tuple(payload.get("names") or ()))
            ctx = [lab.context()] if lab.names else None
            _, g = self.clusterer([payload["responses"]], lab.task, [label], contexts=ctx)
            self._gold_id_cache[key] = int(g[0])
        return self._gold_id_cache[key]

    # -- the step ----------------------------------------------------------------------------------
    def decide(self, experiences: Sequence[Any], features: Sequence[CapturedFeatures] | None,
               fetch_raw=None):
        """Run CARE on one step and write the results into the experiences.

        ``features``: one block per experience, raw or (``--care.worker_reduce first_layer``) all
        projected with this step's :meth:`CareController.first_layer_projection`; then
        ``fetch_raw(prompt_pairs, resp_pairs) -> (h_prompt [n, H], h_resp [m, H])`` must return
        the raw prompt / response states of ``(experience number, row)`` pairs (the policy
        workers keep them).

        Per row: ``rewards`` and ``info["reward"]`` become CARE's reward (gold for bought/cached
        prompts, majority-vote pseudo reward otherwise); the reward function's own value is kept in
        ``info["care/reward_fn"]``; ``info["care/weight"]`` float32 [rows] is the prompt's
        advantage weight (0 = dropped). Returns the :class:`care_ext.decision.Decision`.
        """
        batch = regroup(experiences, self.G, self.tokenizer, self.options.task, features,
                        self.config.repeated_uids)
        self._record_run_id()
        simulation = self.controller.oracle.simulation
        ids, gold_ids = answer_ids_by_task(self.clusterer, batch, with_gold=simulation)
        self._gold_id_cache.clear()
        uids = [lab.uid for lab in batch.labels]
        if simulation:
            for i, lab in enumerate(batch.labels):
                if lab.answer is not None:
                    self._gold_by_uid[lab.uid] = lab.answer
                    key = (lab.uid, str(lab.answer), tuple(batch.responses[i]))
                    self._gold_id_cache[key] = int(gold_ids[i])
        payloads = [{"uid": lab.uid, "task": lab.task, "names": list(lab.names), "prompt": p, "responses": list(r)}
                    for lab, p, r in zip(batch.labels, batch.prompts, batch.responses)]
        versions = {f.version for f in features} if features else {None}
        if len(versions) > 1:
            raise ValueError(f"captured feature blocks of one step carry projection versions {sorted(versions, key=str)}")
        version = versions.pop()
        if version is None:
            d = self.controller.decide(uids, ids, lengths=batch.lengths, h_prompt=batch.h_prompt,
                                       h_resp=batch.h_resp, payloads=payloads)
        else:
            if fetch_raw is None:
                raise ValueError("projected features need fetch_raw (the workers keep the raw rows)")
            projected = ProjectedHidden(batch.h_prompt, batch.h_resp, version,
                                        _group_fetcher(batch.where, fetch_raw, self.G))
            d = self.controller.decide(uids, ids, lengths=batch.lengths, projected=projected,
                                       payloads=payloads)
        for e in experiences:
            n = e.sequences.shape[0]
            e.info["care/reward_fn"] = e.rewards.detach().clone().float().reshape(n)
            e.info["care/weight"] = torch.zeros(n, dtype=torch.float32)
        for b, w in enumerate(batch.where):
            for pos, (k, r) in enumerate(w):
                e = experiences[k]
                e.rewards[r] = d.rewards[b, pos].to(e.rewards.dtype)
                e.info["care/weight"][r] = d.weight[b]
        for e in experiences:
            e.info["reward"] = e.rewards.detach().clone()
        counts = torch.bincount(d.source.long(), minlength=4).tolist()
        mets = {f"care/n_{SOURCE_NAMES[s]}": float(c) for s, c in enumerate(counts)}
        mets.update(d.metrics)
        if features:
            mets["care/features_projected"] = float(version is not None)
        self.last_metrics = mets
        self.last_decision = d
        return d

    def after_policy_update(self) -> dict[str, float]:
        """Train the classifiers on this step's labels (``controller.update``) and return the
        step's CARE metrics, every key under ``care/`` (wandb ``train/care/...``). With
        ``--care.background_update true`` the training runs on while the next rollouts are
        generated, and ``care/classifier/train/*`` are the previous update's."""
        out = dict(self.last_metrics)
        out.update({f"classifier/{k}": v for k, v in self.controller.update().items()})
        self.last_metrics = {}
        return {k if k.startswith("care/") else f"care/{k}": float(v) for k, v in out.items()
                if isinstance(v, (int, float)) and math.isfinite(float(v))}

    # -- state -------------------------------------------------------------------------------------
    def state_path(self, global_step: int | None = None, tag: str | None = None) -> Path:
        """The CARE state file saved with OpenRLHF's checkpoint ``tag`` (``global_step{N}`` for a
        regular one, ``best_global_step{N}`` for a best-metric one; default ``global_step{N}``)."""
        tag = f"global_step{int(global_step)}" if tag is None else str(tag)
        return self.state_dir / f"care_state_{tag}.pt"

    def save(self, global_step: int | None = None, keep: int | None = None, tag: str | None = None,
             keep_tags: Sequence[str] | None = None) -> Path:
        """Save the controller state as that of checkpoint ``tag`` (atomic), then prune.

        Args:
            global_step: names the file ``global_step{N}`` when ``tag`` is None.
            keep: without ``keep_tags``: keep the newest ``keep`` regular files and the newest
                best one (OpenRLHF keeps one best checkpoint).
            tag: OpenRLHF's checkpoint tag (see :meth:`state_path`).
            keep_tags: the checkpoint tags OpenRLHF still holds: every other file is deleted
                (this one is always kept).
        """
        path = self.state_path(global_step, tag)
        self.controller.save(path)
        files = {m.group(1): p for p in self.state_dir.glob("care_state_*.pt")
                 if (m := _STATE_FILE.fullmatch(p.name))}
        if keep_tags is not None:
            stale = [p for t, p in files.items() if t not in set(keep_tags) and p != path]
        elif keep and keep > 0:
            def newest_first(prefix):
                return sorted((p for t, p in files.items() if t.startswith(prefix)),
                              key=lambda p: -int(_STATE_FILE.fullmatch(p.name).group(2)))
            stale = newest_first("global_step")[keep:] + newest_first("best_")[1:]
            stale = [p for p in stale if p != path]
        else:
            stale = []
        for old in stale:
            old.unlink(missing_ok=True)
        return path

    def _record_run_id(self) -> None:
        """Write the controller's run id to ``<state_dir>/care_run_id.json`` (atomically) unless
        it is the one last written: before the first decide of a run, and after a load."""
        run = self.controller.run_id
        if run == self._recorded_run_id:
            return
        path = self.state_dir / RUN_ID_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"run_id": run}))
        os.replace(tmp, path)
        self._recorded_run_id = run

    def resume_without_state(self) -> str | None:
        """Continue the run that decided in this state dir, when OpenRLHF resumes at global
        step 0 (``--ckpt.load_enable`` after a crash before the first checkpoint).

        Such a run restarts at step 0 without a CARE checkpoint, so its controller would get a
        new run id, and the label store would give each of the re-run steps a fresh per-step
        cap next to the charges the crashed attempt already made at that step (its rollouts
        differ, so it picks other prompts). Taking over the recorded run id keeps the caps of
        the steps it reruns. Returns the run id taken over, or None (nothing recorded)."""
        path = self.state_dir / RUN_ID_FILE
        if not path.exists():
            return None
        try:
            run = json.loads(path.read_text())["run_id"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a CARE run-id record ({exc!r}); delete it to start "
                             "a new CARE run") from exc
        if not isinstance(run, str):
            raise ValueError(f"{path}: run_id must be a string, got {run!r}")
        self.controller.run_id = run
        self._recorded_run_id = run
        return run

    def load(self, global_step: int, tag: str | None = None) -> bool:
        """Restore the state saved with checkpoint ``tag`` (default ``global_step{N}``), the one
        OpenRLHF resumes at ``global_step``. Missing file: error, or (with
        ``require_state_on_resume=False``) a warning and False."""
        path = self.state_path(global_step, tag)
        if not path.exists():
            msg = (f"resuming OpenRLHF at global_step {global_step} (checkpoint "
                   f"{tag or f'global_step{global_step}'}) but no CARE state at {path}; pass "
                   "--care.state_dir, or --care.require_state_on_resume false to start CARE afresh")
            if self.options.require_state_on_resume:
                raise FileNotFoundError(msg)
            warnings.warn(msg, RuntimeWarning)
            return False
        self.controller.load(path)
        return True

    def close(self) -> None:
        close = getattr(self.clusterer, "close", None)
        if callable(close):
            close()
        self.controller.store.close()
