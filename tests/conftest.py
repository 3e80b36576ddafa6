"""Shared fixtures: one tiny random Llama + BPE tokenizer per test session, built in a temp dir.

The tokenizer is trained on the same chain-sum corpus the quickstart uses, so prompts
render to the same kind of token ids as in a real run; the model is random (2 layers,
hidden size 64), which is all the rollout and loading tests need.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from spiral_lit.prompts import PromptConfig
from spiral_lit.runtime.models import PolicyConfig, TinyModelConfig, build_tiny_policy, load_policy
from spiral_lit.tasks import ChainSumTask
from spiral_lit.tools.tiny import tokenizer_corpus

TINY = TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2)


def random_causal_lm(family: str, attention: str, vocab_size: int) -> torch.nn.Module:
    """A 2-layer Llama or Qwen2 with grouped-query attention (as Qwen and Llama 3 use) and large random weights
    (``initializer_range=0.2``), so attention is sharp and a wrong position id or mask shows in the logits; the
    same weights on every call."""
    common = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "initializer_range": 0.2,
        "attn_implementation": attention,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if family == "llama":
            return LlamaForCausalLM(LlamaConfig(**common)).float()
        return Qwen2ForCausalLM(Qwen2Config(**common)).float()


@dataclass
class TinyPolicy:
    """The directory written by ``build_tiny_policy`` and the objects it returned (before any reload)."""

    path: Path
    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory: pytest.TempPathFactory) -> TinyPolicy:
    out = tmp_path_factory.mktemp("tiny_policy")
    corpus = list(tokenizer_corpus(ChainSumTask(), PromptConfig(), n_problems=200))
    model, tokenizer = build_tiny_policy(out, corpus, TINY)
    return TinyPolicy(out, model.eval(), tokenizer)


@pytest.fixture(scope="session")
def loaded_policy(tiny_policy: TinyPolicy) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The tiny policy read back through ``load_policy`` (the path every run takes); treat as read-only."""
    model, tokenizer = load_policy(PolicyConfig(path=str(tiny_policy.path)))
    return model.eval(), tokenizer
