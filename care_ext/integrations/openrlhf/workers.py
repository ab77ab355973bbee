"""The CARE policy worker: OpenRLHF's ``PolicyModelActor`` whose experience forward also captures
hidden states (:mod:`.capture`), and hands them to the trainer through ``care_pop_features``
(with ``--care.worker_reduce first_layer``: their first-layer projections, the raw rows served
later by ``care_fetch_raw``)."""
from __future__ import annotations

from .version import check_openrlhf_version

check_openrlhf_version()

from openrlhf.trainer.ray.ppo_actor import PolicyModelActor as _StockPolicyModelActor  # noqa: E402

from .capture import capture_forward  # noqa: E402
from .config import OpenRLHFCareOptions  # noqa: E402
from .install import rewrap_actor, unwrap_actor  # noqa: E402

_STOCK_POLICY, _STOCK_POLICY_OPTIONS = unwrap_actor(_StockPolicyModelActor)


class CarePolicyModelActorImpl(_STOCK_POLICY):
    """Stock policy worker + lm_head-input capture in ``forward`` (the old-log-prob pass).

    Capture is on when the job's ``--care.*`` options say so (``capture``/strategy). Each forward
    appends one :class:`~.capture.CapturedFeatures` (h_prompt [B, H], h_resp [B, H], checksum [B]);
    ``care_pop_features`` returns and clears the list (called once per step by the trainer).

    With ``--care.worker_reduce first_layer`` the trainer first sends the step's projection
    (``care_set_projection``); each forward then ships the projected rows and keeps the raw ones,
    which ``care_pop_features`` makes fetchable (``care_fetch_raw``) until the next pop.
    """

    def _care_options(self) -> OpenRLHFCareOptions:
        if not hasattr(self, "_care_opts"):
            self._care_opts = OpenRLHFCareOptions.from_env()
            self._care_capture = self._care_opts.needs_hidden_states()
            self._care_features = []
            self._care_projection = None  # FirstLayerProjection of this step, on the model's device
            self._care_raw = []  # raw (h_prompt, h_resp) of the blocks popped last, by block number
        return self._care_opts

    def forward(self, sequences, action_mask=None, attention_mask=None, packed_seq_lens=None,
                mm_train_inputs_list=None):
        opts = self._care_options()
        stock = super().forward
        if not self._care_capture:
            return stock(sequences, action_mask, attention_mask, packed_seq_lens, mm_train_inputs_list)
        out, feats = capture_forward(
            self.actor, lambda: stock(sequences, action_mask, attention_mask, packed_seq_lens, mm_train_inputs_list),
            sequences, action_mask, attention_mask, opts.feature_dtype,
            ring_group=getattr(self.strategy, "ring_attn_group", None), projection=self._care_projection)
        self._care_features.append(feats)
        return out

    def care_set_projection(self, projection) -> None:
        """Project the next forwards' features with ``projection``
        (:class:`care_ext.projection.FirstLayerProjection`, moved to this worker's GPU) or, with
        None, ship raw hidden states. Called by the trainer before each step's forwards."""
        opts = self._care_options()
        if projection is not None and opts.worker_reduce == "off":
            raise RuntimeError("care_set_projection with --care.worker_reduce off")
        if projection is not None:
            import torch

            projection = projection.to(torch.cuda.current_device() if torch.cuda.is_available() else "cpu")
        self._care_projection = projection

    def care_pop_features(self):
        """list[CapturedFeatures] captured since the last call, in forward order (then cleared).

        Projected blocks leave their raw rows here: they replace the previous pop's as what
        ``care_fetch_raw`` serves (block numbers = positions in the returned list)."""
        self._care_options()
        out, self._care_features = self._care_features, []
        self._care_raw = [f.raw for f in out]
        for f in out:
            f.raw = None
        return out

    def care_fetch_raw(self, prompt_requests, resp_requests):
        """Raw hidden states of rows of the last popped blocks.

        Args:
            prompt_requests, resp_requests: lists of ``(block, row)`` (block number in the last
                ``care_pop_features`` result, row in that micro-batch) whose last-prompt-token and
                last-response-token states are wanted (the trainer asks one prompt state per
                prompt group, G response states).

        Returns:
            ``(h_prompt [n, H] or None, h_resp [m, H] or None)`` on the CPU, in request order
            (None for an empty request list).
        """
        import torch

        self._care_options()

        def take(requests, part):
            rows = []
            for j, r in requests:
                if not 0 <= j < len(self._care_raw) or self._care_raw[j] is None:
                    raise ValueError(f"care_fetch_raw: block {j} holds no raw rows (last pop had "
                                     f"{len(self._care_raw)} blocks; projected ones only)")
                rows.append(self._care_raw[j][part][r])
            return torch.stack(rows) if rows else None

        if not prompt_requests and not resp_requests:
            raise ValueError("care_fetch_raw: no rows requested")
        return take(prompt_requests, 0), take(resp_requests, 1)

    def care_info(self) -> dict:
        """What this worker runs (class, the options it read): for launch checks and tests."""
        opts = self._care_options()
        return {"class": type(self).__name__, "mro": [c.__name__ for c in type(self).__mro__],
                "capture": self._care_capture, "options": opts.to_json()}


CarePolicyModelActor = rewrap_actor(CarePolicyModelActorImpl, _STOCK_POLICY_OPTIONS)
"""The Ray actor class the launcher puts in place of ``PolicyModelActor``."""
