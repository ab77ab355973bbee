"""The CARE policy worker: OpenRLHF's ``PolicyModelActor`` whose experience forward also captures
hidden states (:mod:`.capture`), and hands them to the trainer through ``care_pop_features``."""
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
    """

    def _care_options(self) -> OpenRLHFCareOptions:
        if not hasattr(self, "_care_opts"):
            self._care_opts = OpenRLHFCareOptions.from_env()
            self._care_capture = self._care_opts.needs_hidden_states()
            self._care_features = []
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
            ring_group=getattr(self.strategy, "ring_attn_group", None))
        self._care_features.append(feats)
        return out

    def care_pop_features(self):
        """list[CapturedFeatures] captured since the last call, in forward order (then cleared)."""
        self._care_options()
        out, self._care_features = self._care_features, []
        return out

    def care_info(self) -> dict:
        """What this worker runs (class, the options it read): for launch checks and tests."""
        opts = self._care_options()
        return {"class": type(self).__name__, "mro": [c.__name__ for c in type(self).__mro__],
                "capture": self._care_capture, "options": opts.to_json()}


CarePolicyModelActor = rewrap_actor(CarePolicyModelActorImpl, _STOCK_POLICY_OPTIONS)
"""The Ray actor class the launcher puts in place of ``PolicyModelActor``."""
