"""rollout/hf.py beyond the engine contract (test_engine_contract.py): what a checkpoint's generation_config may
change."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from rollout_checks import chat_prompts, ids

from spiral_lit.rollout import HFGenerateEngine, SamplingConfig

LEAKS = "transformers fills the settings the engine leaves unset from model.generation_config (hf._generation_config)"


@pytest.mark.parametrize(
    "defaults",
    [
        {"do_sample": True, "temperature": 0.1, "top_k": 2, "top_p": 0.5},  # Qwen3 ships T=0.6, top_k=20, top_p=0.95
        pytest.param({"repetition_penalty": 3.0}, marks=pytest.mark.xfail(strict=True, reason=LEAKS)),
        pytest.param({"no_repeat_ngram_size": 1}, marks=pytest.mark.xfail(strict=True, reason=LEAKS)),
        pytest.param({"min_new_tokens": 8}, marks=pytest.mark.xfail(strict=True, reason=LEAKS)),
    ],
)
def test_a_checkpoints_generation_defaults_change_no_rollout(loaded_policy, defaults: dict[str, Any]) -> None:
    """Rollouts follow SamplingConfig alone: the recorded log-probs must stay those of softmax(logits / T)."""
    model, tokenizer = loaded_policy
    engine, prompts = HFGenerateEngine(model, tokenizer), chat_prompts(tokenizer)
    for sampling in (SamplingConfig(max_new_tokens=8, temperature=1.0), SamplingConfig(8, temperature=0.0)):
        plain = engine.generate(prompts, n=2, sampling=sampling, seed=3)
        saved = copy.deepcopy(model.generation_config)
        model.generation_config.update(**defaults)
        try:
            shipped = engine.generate(prompts, n=2, sampling=sampling, seed=3)
        finally:
            model.generation_config = saved
        assert ids(shipped) == ids(plain)
        for g1, g2 in zip(shipped, plain, strict=True):
            for c1, c2 in zip(g1, g2, strict=True):
                assert torch.equal(c1.logprobs, c2.logprobs)
