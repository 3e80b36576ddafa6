"""rollout/kv_cache.py (KVCacheEngine) beyond the engine contract (test_engine_contract.py): batch compaction,
chunking of sampled requests and the shared prefill, on the tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from rollout_checks import EOSBias, chat_prompts, ids

from spiral_lit.rollout import KVCacheEngine, SamplingConfig
from spiral_lit.rollout.kv_cache import _BlockLayer


@pytest.fixture(scope="module")
def policy(loaded_policy):
    return loaded_policy


@pytest.fixture(scope="module")
def prompts(policy) -> list[list[int]]:
    """Four chat-rendered prompts of different lengths, one an aggregation prompt (left padding up to ~8x)."""
    return chat_prompts(policy[1])


def test_compaction_and_chunking_do_not_change_rollouts(policy, prompts, monkeypatch) -> None:
    """Rows draw their own uniforms, so dropping finished rows or splitting the request changes no sample."""
    model, tokenizer = policy
    compacted_to: list[int] = []
    original = _BlockLayer.reshape

    def recording_reshape(self, rows_R, capacity):
        compacted_to.append(-1 if rows_R is None else len(rows_R))
        return original(self, rows_R, capacity)

    monkeypatch.setattr(_BlockLayer, "reshape", recording_reshape)
    settings = [(None, 256), (1, 256), (3, 256), (1, 5), (None, 1)]  # (compact_every, max_batch_size)
    handle = model.lm_head.register_forward_hook(EOSBias(tokenizer.eos_token_id, bias=3.5))
    try:
        for sampling in (SamplingConfig(12, temperature=0.0), SamplingConfig(12, temperature=1.0)):
            runs = {}
            for compact, batch in settings:
                compacted_to.clear()
                engine = KVCacheEngine(model, tokenizer, max_batch_size=batch, compact_every=compact)
                runs[(compact, batch)] = engine.generate(prompts, n=3, sampling=sampling, seed=5)
                if (compact, batch) == (1, 256) and sampling.temperature > 0:
                    assert any(0 < rows < 12 for rows in compacted_to), "no compaction happened"
            reference = runs[(None, 256)]
            for key, out in runs.items():
                assert ids(out) == ids(reference), key
                assert [[c.finish_reason for c in g] for g in out] == [[c.finish_reason for c in g] for g in reference]
                for g1, g2 in zip(out, reference, strict=True):
                    for c1, c2 in zip(g1, g2, strict=True):
                        torch.testing.assert_close(c1.logprobs, c2.logprobs, atol=1e-5, rtol=0)
        assert len({c.num_tokens for g in reference for c in g}) > 2, "traces should end at varied steps"
    finally:
        handle.remove()


def test_each_distinct_prompt_is_prefilled_once(policy, prompts) -> None:
    model, tokenizer = policy
    batch_sizes = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    no_eos = model.lm_head.register_forward_hook(EOSBias(tokenizer.eos_token_id, bias=-1e4))
    try:
        out = KVCacheEngine(model, tokenizer).generate(
            [prompts[1], prompts[2], prompts[1]], n=4, sampling=SamplingConfig(3, temperature=1.0), seed=0
        )
    finally:
        handle.remove()
        no_eos.remove()
    assert batch_sizes[0] == (2, len(prompts[2]))  # prefill: two distinct prompts, left-padded to the longest
    assert all(shape == (12, 1) for shape in batch_sizes[1:])  # decode: 3 x 4 sample rows, one token each
    assert [len(g) for g in out] == [4, 4, 4]
    assert ids(out)[0] != ids(out)[2]  # the repeated prompt still gets its own samples
