"""Shared helpers of the OpenRLHF adapter tests: a real word-level HF tokenizer built in memory
(no hub download) and raw single-sample Experiences laid out as OpenRLHF's rollout makes them."""
from __future__ import annotations

import torch


def word_tokenizer(words):
    """A ``PreTrainedTokenizerFast`` over ``words`` (+ <pad>, <eos>, <unk>), whitespace-split."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def raw_sample(tokenizer, prompt_words, response_words, label, prompt_text, reward):
    """One single-sample Experience as OpenRLHF 0.11.2's rollout builds it: sequences [1, T],
    action_mask [1, T-1] marking the response tokens, episode tensors [1]."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    p = tokenizer.convert_tokens_to_ids(prompt_words)
    r = tokenizer.convert_tokens_to_ids(response_words) + [tokenizer.eos_token_id]
    seq = torch.tensor([p + r])
    T = seq.shape[1]
    am = torch.zeros(1, T - 1, dtype=torch.bool)
    am[0, len(p) - 1:] = True
    return Experience(
        sequences=seq, attention_mask=torch.ones(1, T, dtype=torch.long), action_mask=am,
        rewards=torch.tensor([float(reward)]), scores=torch.tensor([float(reward)]),
        response_length=torch.tensor([float(len(r))]), truncated=torch.tensor([0.0]),
        total_length=torch.tensor([float(T)]), prompts=[prompt_text], labels=[label],
        info={"reward": torch.tensor([float(reward)]), "score": torch.tensor([float(reward)])})
