"""rollout/engine.py (KVCacheEngine) on the tiny random Llama, against model.generate and a training forward."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from rollout_checks import EOSBias, EOSOnStep, training_logprobs

from spiral_lit.prompts import PromptConfig, PromptRenderer
from spiral_lit.rollout import HFGenerateEngine, KVCacheEngine, SamplingConfig, make_engine
from spiral_lit.rollout.kv_cache import _BlockLayer
from spiral_lit.tasks import ChainSumTask


@pytest.fixture(scope="module")
def policy(loaded_policy):
    return loaded_policy


@pytest.fixture(scope="module")
def prompts(policy) -> list[list[int]]:
    """Four chat-rendered prompts of different lengths, one an aggregation prompt (left padding up to ~4x)."""
    _, tokenizer = policy
    task = ChainSumTask()
    renderer = PromptRenderer(tokenizer, PromptConfig(), task.answer_instruction)
    problem = task.problem(0, "train")
    out = [
        renderer.search(ChainSumTask(n_terms=5).problem(0, "train")),
        renderer.search(ChainSumTask(n_terms=2, digits=1).problem(0, "train")),
        renderer.search(ChainSumTask(n_terms=3, digits=2).problem(0, "train")),
        renderer.aggregation_from_texts(problem, [problem.solution or ""] * 2, random.Random(0)),
    ]
    assert len({len(p) for p in out}) == 4
    return out


def _ids(groups) -> list[list[list[int]]]:
    return [[c.token_ids for c in group] for group in groups]


def test_greedy_equals_model_generate_and_hf_engine(policy, prompts) -> None:
    model, tokenizer = policy
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    out = KVCacheEngine(model, tokenizer).generate(prompts, n=2, sampling=greedy, seed=0)
    assert _ids(out) == _ids(HFGenerateEngine(model, tokenizer).generate(prompts, n=2, sampling=greedy, seed=0))
    for prompt, group in zip(prompts, out, strict=True):
        with torch.no_grad():
            reference = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=12,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )[0, len(prompt) :].tolist()
        if tokenizer.eos_token_id in reference:
            reference = reference[: reference.index(tokenizer.eos_token_id) + 1]
        assert [c.token_ids for c in group] == [reference, reference]
        # At temperature 0 the recorded log-probs are of the untempered distribution.
        (want,) = training_logprobs(model, [prompt], [group[0].token_ids], 1.0)
        torch.testing.assert_close(group[0].logprobs, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (0.7, 0.9)])
def test_sampler_logprobs_match_a_training_forward(policy, prompts, temperature: float, top_p: float) -> None:
    model, tokenizer = policy
    sampling = SamplingConfig(max_new_tokens=10, temperature=temperature, top_p=top_p)
    out = KVCacheEngine(model, tokenizer).generate(prompts, n=3, sampling=sampling, seed=7)
    rows = [(p, c) for p, group in zip(prompts, out, strict=True) for c in group]
    expected = training_logprobs(model, [p for p, _ in rows], [c.token_ids for _, c in rows], temperature)
    for (prompt, completion), want in zip(rows, expected, strict=True):
        assert completion.logprobs.dtype == torch.float32
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        # Includes the shorter prompts, which were left-padded in the shared prefill and decode batch.
        torch.testing.assert_close(completion.logprobs, want, atol=1e-4, rtol=0, msg=f"prompt length {len(prompt)}")


def test_same_seed_same_rollouts_different_seed_different(policy, prompts) -> None:
    model, tokenizer = policy
    engine = KVCacheEngine(model, tokenizer)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0)
    rng_before = torch.get_rng_state()
    first = engine.generate(prompts, n=2, sampling=sampling, seed=123)
    again = engine.generate(prompts, n=2, sampling=sampling, seed=123)
    other = engine.generate(prompts, n=2, sampling=sampling, seed=124)
    assert torch.equal(torch.get_rng_state(), rng_before)  # an explicit generator; the global RNG is untouched
    assert _ids(first) == _ids(again)
    assert _ids(first) != _ids(other)
    for g1, g2 in zip(first, again, strict=True):
        assert [c.num_tokens for c in g1] == [c.num_tokens for c in g2]
        for c1, c2 in zip(g1, g2, strict=True):
            assert torch.equal(c1.logprobs, c2.logprobs)
    # Samples of one prompt draw different numbers: not all identical.
    assert len({tuple(c.token_ids) for c in first[0]}) > 1


def test_eos_gives_stop_and_budget_gives_length(policy, prompts) -> None:
    model, tokenizer = policy
    eos = tokenizer.eos_token_id
    handle = model.lm_head.register_forward_hook(EOSOnStep(eos, row=0, step=3))
    try:
        (group,) = KVCacheEngine(model, tokenizer).generate(prompts[:1], n=2, sampling=SamplingConfig(7), seed=0)
    finally:
        handle.remove()
    stopped, running = group
    assert stopped.finish_reason == "stop"
    assert stopped.num_tokens == 3
    assert stopped.token_ids[-1] == eos and eos not in stopped.token_ids[:-1]
    assert stopped.logprobs[-1].item() == pytest.approx(0.0, abs=1e-6)
    assert "<|im_end|>" not in stopped.text
    assert running.finish_reason == "length"
    assert running.num_tokens == 7
    assert eos not in running.token_ids
    assert running.logprobs.shape == (7,)


def test_stop_strings_end_a_trace_at_the_token_that_completes_them(policy, prompts) -> None:
    model, tokenizer = policy
    engine = KVCacheEngine(model, tokenizer)
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0)
    (free,) = engine.generate(prompts[:1], n=1, sampling=greedy, seed=0)[0]
    assert free.num_tokens >= 6, "the random model stopped too early for this test"
    stop = tokenizer.decode(free.token_ids[3:5])
    # The first prefix of the free-running trace that contains the stop string.
    k = next(k for k in range(1, free.num_tokens + 1) if stop in tokenizer.decode(free.token_ids[:k]))
    stopping = SamplingConfig(max_new_tokens=16, temperature=0.0, stop_strings=["never appears", stop])
    (group,) = engine.generate(prompts[:1], n=2, sampling=stopping, seed=0)
    for completion in group:
        assert completion.token_ids == free.token_ids[:k]
        assert completion.finish_reason == "stop"
        torch.testing.assert_close(completion.logprobs, free.logprobs[:k])


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
                assert _ids(out) == _ids(reference), key
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
    assert _ids(out)[0] != _ids(out)[2]  # the repeated prompt still gets its own samples


def test_generate_restores_training_mode(policy, prompts) -> None:
    model, tokenizer = policy
    model.train()
    try:
        KVCacheEngine(model, tokenizer).generate(prompts[:1], n=1, sampling=SamplingConfig(max_new_tokens=2), seed=0)
        assert model.training
    finally:
        model.eval()


def test_make_engine_dispatches_on_backend(policy) -> None:
    model, tokenizer = policy
    assert isinstance(make_engine("kv_cache", model, tokenizer, 8), KVCacheEngine)
    assert isinstance(make_engine("hf", model, tokenizer, 8), HFGenerateEngine)
    with pytest.raises(ValueError, match="backend='bogus'"):
        make_engine("bogus", model, tokenizer)  # type: ignore[arg-type]


def test_one_seed_per_prompt_makes_a_prompts_samples_independent_of_the_others(policy, prompts) -> None:
    """Evaluation's guarantee (issue 4): a prompt's rollouts do not depend on its batch (up to floating point)."""
    model, tokenizer = policy
    engine = KVCacheEngine(model, tokenizer)
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0)
    together = engine.generate(prompts, n=2, sampling=sampling, seed=[5, 6, 7, 8])
    alone = engine.generate(prompts[1:2], n=2, sampling=sampling, seed=[6])
    reordered = engine.generate([prompts[3], prompts[1]], n=2, sampling=sampling, seed=[8, 6])
    assert _ids(alone) == _ids(together)[1:2]
    assert _ids(reordered) == [_ids(together)[3], _ids(together)[1]]
    assert _ids(together)[0] != _ids(engine.generate(prompts[:1], n=2, sampling=sampling, seed=[9]))[0]


def test_outputs_and_model_stay_usable_for_training(policy, prompts) -> None:
    """Decoding runs in inference mode; what it returns, and the model it ran, must still work with autograd."""
    model, tokenizer = policy
    trainee = copy.deepcopy(model)
    (group,) = KVCacheEngine(trainee, tokenizer).generate(prompts[:1], n=2, sampling=SamplingConfig(4), seed=0)
    old_logprobs = group[0].logprobs
    assert not old_logprobs.is_inference()
    (new_logprobs,) = training_logprobs_with_grad(trainee, prompts[0], group[0].token_ids)
    # A product saves old_logprobs for backward, which autograd refuses for inference-mode tensors.
    (new_logprobs * old_logprobs).sum().backward()
    assert all(p.grad is not None for p in trainee.parameters() if p.requires_grad)


def training_logprobs_with_grad(model, prompt: list[int], completion: list[int]) -> tuple[torch.Tensor]:
    """log_softmax at the completion tokens of one unpadded sequence, with the autograd graph kept."""
    ids = torch.tensor([prompt + completion])
    logits_TV = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return (torch.log_softmax(logits_TV, dim=-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1),)
