"""CARE in OpenRLHF's experience-making stage: :class:`CareExperienceMaker`.

A subclass of ``openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker`` (0.11.2):

* ``make_experience``: the stock forwards (policy, reference, critic), then the policy workers'
  captured hidden states are fetched, and :meth:`CareRunner.decide` regroups the rows by
  ``index // G``, reads and clusters the answers, runs the CARE core, and overwrites ``rewards`` /
  ``info["reward"]``; ``info["care/weight"]`` holds each row's prompt weight.
* ``compute_advantages_and_returns``: the stock advantages (group_norm etc.), then ``advantages``
  and ``returns`` of each row times its prompt weight. Exact when the KL term is a loss
  (``--algo.kl.use_loss``) or off; with KL in the reward the weight scales that penalty too.
* ``make_experience_batch``: with ``--care.drop_mode remove`` the dropped prompts' rows leave the
  batch, down to whole optimizer steps (see :meth:`CareExperienceMaker.make_experience_batch`).
"""
from __future__ import annotations

import math
from typing import List

import torch

from .version import check_openrlhf_version

check_openrlhf_version()

from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker  # noqa: E402

WEIGHT_KEY = "care/weight"


def select_row(e: Experience, r: int) -> Experience:
    """A one-row Experience holding row ``r`` of ``e`` (tensors keep a leading dim of 1)."""
    n = e.sequences.shape[0]
    kw = {}
    for name in Experience.__dataclass_fields__:
        v = getattr(e, name)
        if isinstance(v, torch.Tensor):
            kw[name] = v[r:r + 1]
        elif name == "info":
            kw[name] = {k: (t[r:r + 1] if isinstance(t, torch.Tensor) else [t[r]] if isinstance(t, list) and len(t) == n else t)
                        for k, t in v.items()}
        elif isinstance(v, list):
            kw[name] = [v[r]] if len(v) == n else list(v)
        else:
            kw[name] = v
    return Experience(**kw)


def remove_dropped(experiences: List[Experience], granularity: int, rows_per_experience: int,
                   pad_token_id: int) -> List[Experience]:
    """Remove the rows of dropped prompts (``info["care/weight"] == 0``) from the batch.

    The kept rows are topped up with the fewest zero-weight rows (zero advantage) that make the
    count a positive multiple of ``granularity``, and repacked into experiences of
    ``rows_per_experience`` rows. The adapter passes one optimizer step's rows
    (``--train.batch_size``, all DP ranks), see :meth:`CareExperienceMaker.make_experience_batch`.

    Args:
        experiences: after ``compute_advantages_and_returns``.
        granularity: the sample count must be a multiple of this.
        rows_per_experience: rows per returned Experience.
        pad_token_id: right-padding id of ``sequences``.

    Returns:
        The new experience list; rows keep their order of ``index``.
    """
    kept, filler = [], []
    for e in experiences:
        w = e.info[WEIGHT_KEY]
        for r in range(e.sequences.shape[0]):
            (kept if float(w[r]) != 0.0 else filler).append((int(e.index[r]), e, r))
    total = len(kept) + len(filler)
    target = max(granularity, math.ceil(len(kept) / granularity) * granularity)
    target = min(target, total)
    chosen = sorted(kept + filler[: target - len(kept)], key=lambda t: t[0])
    singles = [select_row(e, r) for _, e, r in chosen]
    return [Experience.concat_experiences(singles[i:i + rows_per_experience], pad_token_id)
            for i in range(0, len(singles), rows_per_experience)]


class CareExperienceMaker(RemoteExperienceMaker):
    """RemoteExperienceMaker with CARE labels, weights and drops (see the module docstring).

    Args: those of ``RemoteExperienceMaker`` plus ``care`` (a :class:`CareRunner`) and
    ``capture`` (bool: the policy workers capture hidden states, fetch them each step).
    """

    def __init__(self, *args, care=None, capture: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if care is None:
            raise ValueError("CareExperienceMaker needs care= (a CareRunner)")
        self.care = care
        self.capture = bool(capture)

    def _fetch_features(self, n_micro: int):
        """The policy workers' captured features, one per micro-batch, in dispatch order, and
        where each block lives: ``[(worker handle index, block number on it)]``.

        ``async_run_method_batch`` gives effective worker c (handle ``c * dup``; the ring/TP
        duplicates hold the same rows) one contiguous chunk of micro-batches."""
        import ray

        args = self.strategy.args
        dup = args.ds.ring_attn_size * args.ds.tensor_parallel_size
        per_actor = ray.get(self.actor_model_group.async_run_method(method_name="care_pop_features"))
        feats, owners = [], []
        for a in range(0, len(per_actor), dup):
            feats.extend(per_actor[a])
            owners.extend((a, j) for j in range(len(per_actor[a])))
        if len(feats) != n_micro:
            raise RuntimeError(f"policy workers returned {len(feats)} captured feature blocks for "
                               f"{n_micro} micro-batches")
        return feats, owners

    def _raw_fetcher(self, owners):
        """``fetch(prompt_pairs, resp_pairs) -> (h_prompt [n, H], h_resp [m, H])`` for
        ``(micro-batch, row)`` pairs: one ``care_fetch_raw`` call per worker that holds some."""
        import ray

        handles = self.actor_model_group._actor_handlers

        def fetch(prompt_pairs, resp_pairs):
            asks: dict[int, tuple[list, list]] = {}  # worker -> (prompt, resp) lists of (slot, (block, row))
            for part, pairs in ((0, prompt_pairs), (1, resp_pairs)):
                for i, (k, r) in enumerate(pairs):
                    a, j = owners[k]
                    asks.setdefault(a, ([], []))[part].append((i, (j, r)))
            refs = {a: handles[a].care_fetch_raw.remote([q for _, q in p], [q for _, q in r])
                    for a, (p, r) in asks.items()}
            out = ([None] * len(prompt_pairs), [None] * len(resp_pairs))
            for a, ref in refs.items():
                got = ray.get(ref)
                for part in (0, 1):
                    for n, (i, _) in enumerate(asks[a][part]):
                        out[part][i] = got[part][n]
            return torch.stack(out[0]), torch.stack(out[1])

        return fetch

    def _send_projection(self) -> None:
        """Before the forwards: this step's first-layer projection to every policy worker (None
        until the classifiers exist: the workers then ship raw states)."""
        import ray

        proj = self.care.controller.first_layer_projection()
        ref = ray.put(proj)
        ray.get(self.actor_model_group.async_run_method(method_name="care_set_projection", projection=ref))

    @torch.no_grad()
    def make_experience(self, samples_list: List[Experience]) -> List[Experience]:
        reduce = self.capture and self.care.options.worker_reduce != "off"
        if reduce:
            self._send_projection()
        experiences = super().make_experience(samples_list)
        feats = fetch_raw = None
        if self.capture:
            feats, owners = self._fetch_features(len(experiences))
            fetch_raw = self._raw_fetcher(owners) if reduce else None
        self.care.decide(experiences, feats, fetch_raw=fetch_raw)
        return experiences

    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences: List[Experience]) -> List[Experience]:
        experiences = super().compute_advantages_and_returns(experiences)
        for e in experiences:
            w = e.info[WEIGHT_KEY].to(e.advantages.device)
            e.advantages = e.advantages * w[:, None].to(e.advantages.dtype)
            if e.returns is not None:
                e.returns = e.returns * w[:, None].to(e.returns.dtype)
        return experiences

    @torch.no_grad()
    def make_experience_batch(self, rollout_samples) -> List[Experience]:
        """The stock batch, then with ``--care.drop_mode remove`` the dropped prompts' rows removed.

        What is left is a whole number of optimizer steps (``--train.batch_size`` rows, all DP
        ranks), the gap filled with zero-advantage rows of dropped prompts:

        * DeepSpeed decides its gradient-accumulation boundary by counting micro-batches across
          calls, so a partial last step would carry its gradient into the next rollout's first
          optimizer step;
        * with ``--train.dynamic_batch_enable`` each rank's replay buffer trains only
          ``len // (train.batch_size / DP)`` whole steps and skips the rest without a word.

        Rows are repacked into experiences of ``--train.micro_batch_size`` rows, so the list splits
        evenly over the DP ranks (``balance_experiences`` re-splits it under dynamic batching).
        When one optimizer step is the whole rollout (``train.batch_size == rollout.batch_size *
        G``) nothing can leave: the dropped rows stay as zero-advantage filler, as in ``zero``.
        """
        experiences = super().make_experience_batch(rollout_samples)
        if self.care.options.drop_mode != "remove":
            return experiences
        a = self.strategy.args
        dp = max(1, a.actor.num_nodes * a.actor.num_gpus_per_node // a.ds.ring_attn_size // a.ds.tensor_parallel_size)
        m, step_rows = int(a.train.micro_batch_size), int(a.train.batch_size)
        if step_rows % (dp * m):
            raise ValueError(f"--train.batch_size {step_rows} is not a multiple of DP ranks {dp} x "
                             f"--train.micro_batch_size {m}")
        out = remove_dropped(experiences, step_rows, m, self.tokenizer.pad_token_id)
        rows = [float(w) for e in out for w in e.info[WEIGHT_KEY]]
        self.care.last_metrics["care/rows_trained"] = float(len(rows))
        self.care.last_metrics["care/rows_filler"] = float(sum(w == 0.0 for w in rows))
        return out
