"""A CARE policy worker whose model is a tiny random-initialised HF Llama on the CPU, for the Ray
test of the worker-side reduction: ``care_test_setup`` does what ``init_model_from_pretrained``
does on GPUs (an OpenRLHF ``Actor`` around the model), the rest is the real worker class."""
from types import SimpleNamespace as NS

import ray
import torch

from care_ext.integrations.openrlhf.workers import CarePolicyModelActorImpl

VOCAB = 64


class TinyCarePolicyImpl(CarePolicyModelActorImpl):
    def care_test_setup(self, hidden_size: int = 16) -> int:
        from openrlhf.models import Actor
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.cuda.current_device = lambda: "cpu"  # the stock forward moves inputs there (no GPU here)
        torch.manual_seed(0)  # the same weights on every worker, as after a real load
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                          max_position_embeddings=64, attn_implementation="eager")
        self.actor = Actor(LlamaForCausalLM(cfg).eval())
        self.actor.packing_samples = False
        self.strategy = NS(ring_attn_group=None, is_rank_0=lambda: self._rank == 0)
        return self._rank


TinyCarePolicy = ray.remote(TinyCarePolicyImpl)
