"""rollout/hf.py on the tiny random Llama: ordering, seeding, sampler log-probs vs a training forward, EOS."""

from __future__ import annotations

import pytest
import torch
from rollout_checks import EOSOnStep, training_logprobs

from spiral_lit.prompts import PromptConfig, PromptRenderer
from spiral_lit.rollout import HFGenerateEngine, SamplingConfig
from spiral_lit.tasks import ChainSumTask


@pytest.fixture(scope="module")
def policy(loaded_policy):
    return loaded_policy


@pytest.fixture(scope="module")
def prompts(policy) -> list[list[int]]:
    """Three chat-rendered search prompts of different lengths (the batch is left-padded to the longest)."""
    _, tokenizer = policy
    renderer = PromptRenderer(tokenizer, PromptConfig(), ChainSumTask().answer_instruction)
    out = [
        renderer.search(ChainSumTask(n_terms=5).problem(0, "train")),
        renderer.search(ChainSumTask(n_terms=2, digits=1).problem(0, "train")),
        renderer.search(ChainSumTask(n_terms=3, digits=2).problem(0, "train")),
    ]
    assert len({len(p) for p in out}) == 3
    return out


def test_n_completions_per_prompt_in_order(policy, prompts) -> None:
    model, tokenizer = policy
    engine = HFGenerateEngine(model, tokenizer)
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0)
    out = engine.generate(prompts, n=3, sampling=sampling, seed=0)
    assert [len(group) for group in out] == [3, 3, 3]
    for group in out:
        for completion in group:
            assert 1 <= completion.num_tokens <= 6
            assert completion.logprobs.shape == (completion.num_tokens,)
            assert completion.logprobs.dtype == torch.float32
            assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    # Grouping is per prompt in input order: prompt i alone gives the same rows as group i (greedy, no seed effect).
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    together = engine.generate(prompts, n=2, sampling=greedy, seed=0)
    for prompt, group in zip(prompts, together, strict=True):
        alone = engine.generate([prompt], n=1, sampling=greedy, seed=0)[0][0]
        assert [c.token_ids for c in group] == [alone.token_ids, alone.token_ids]


def test_same_seed_same_completions_different_seed_different(policy, prompts) -> None:
    model, tokenizer = policy
    engine = HFGenerateEngine(model, tokenizer)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0)
    rng_before = torch.get_rng_state()
    first = engine.generate(prompts, n=2, sampling=sampling, seed=123)
    again = engine.generate(prompts, n=2, sampling=sampling, seed=123)
    other = engine.generate(prompts, n=2, sampling=sampling, seed=124)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the engine forks the global RNG
    ids = [[c.token_ids for c in g] for g in first]
    assert ids == [[c.token_ids for c in g] for g in again]
    assert ids != [[c.token_ids for c in g] for g in other]
    for g1, g2 in zip(first, again, strict=True):
        for c1, c2 in zip(g1, g2, strict=True):
            assert torch.equal(c1.logprobs, c2.logprobs)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_a_training_forward(policy, prompts, temperature: float) -> None:
    model, tokenizer = policy
    engine = HFGenerateEngine(model, tokenizer)
    out = engine.generate(prompts, n=2, sampling=SamplingConfig(max_new_tokens=10, temperature=temperature), seed=7)
    rows = [(p, c) for p, group in zip(prompts, out, strict=True) for c in group]
    expected = training_logprobs(model, [p for p, _ in rows], [c.token_ids for _, c in rows], temperature)
    for (prompt, completion), want in zip(rows, expected, strict=True):
        # Includes the shorter prompts, which were left-padded during generation.
        torch.testing.assert_close(completion.logprobs, want, atol=1e-4, rtol=0, msg=f"prompt length {len(prompt)}")


def test_greedy_equals_model_generate(policy, prompts) -> None:
    model, tokenizer = policy
    engine = HFGenerateEngine(model, tokenizer)
    out = engine.generate(prompts, n=1, sampling=SamplingConfig(max_new_tokens=10, temperature=0.0), seed=0)
    for prompt, (completion,) in zip(prompts, out, strict=True):
        with torch.no_grad():
            reference = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=10,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )[0, len(prompt) :].tolist()
        if tokenizer.eos_token_id in reference:
            reference = reference[: reference.index(tokenizer.eos_token_id) + 1]
        assert completion.token_ids == reference
        # At temperature 0 the recorded log-probs are of the untempered distribution.
        (want,) = training_logprobs(model, [prompt], [completion.token_ids], 1.0)
        torch.testing.assert_close(completion.logprobs, want, atol=1e-4, rtol=0)


def test_eos_gives_stop_and_budget_gives_length(policy, prompts) -> None:
    model, tokenizer = policy
    eos = tokenizer.eos_token_id
    engine = HFGenerateEngine(model, tokenizer)
    handle = model.lm_head.register_forward_hook(EOSOnStep(eos, row=0, step=3))
    try:
        (group,) = engine.generate(prompts[:1], n=2, sampling=SamplingConfig(max_new_tokens=7), seed=0)
    finally:
        handle.remove()
    stopped, running = group
    assert stopped.finish_reason == "stop"
    assert stopped.num_tokens == 3
    assert stopped.token_ids[-1] == eos and eos not in stopped.token_ids[:-1]
    assert stopped.logprobs[-1].item() == pytest.approx(0.0, abs=1e-6)  # EOS had probability ~1
    assert "<|im_end|>" not in stopped.text
    assert running.finish_reason == "length"
    assert running.num_tokens == 7
    assert eos not in running.token_ids
    assert running.logprobs.shape == (7,)


def test_chunking_does_not_change_greedy_results(policy, prompts) -> None:
    model, tokenizer = policy
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.0)
    whole = HFGenerateEngine(model, tokenizer, max_batch_size=256).generate(prompts, n=2, sampling=sampling, seed=0)
    chunked = HFGenerateEngine(model, tokenizer, max_batch_size=4).generate(prompts, n=2, sampling=sampling, seed=0)
    single = HFGenerateEngine(model, tokenizer, max_batch_size=1).generate(prompts, n=2, sampling=sampling, seed=0)
    for a, b, c in zip(whole, chunked, single, strict=True):
        assert [x.token_ids for x in a] == [x.token_ids for x in b] == [x.token_ids for x in c]
        assert [x.finish_reason for x in a] == [x.finish_reason for x in c]
        for x, y in zip(a, c, strict=True):
            torch.testing.assert_close(x.logprobs, y.logprobs, atol=1e-4, rtol=0)


def test_generate_restores_training_mode(policy, prompts) -> None:
    model, tokenizer = policy
    model.train()
    try:
        HFGenerateEngine(model, tokenizer).generate(prompts[:1], n=1, sampling=SamplingConfig(max_new_tokens=2), seed=0)
        assert model.training
    finally:
        model.eval()


def test_one_seed_per_prompt_makes_a_prompts_samples_independent_of_the_others(policy, prompts) -> None:
    model, tokenizer = policy
    engine = HFGenerateEngine(model, tokenizer)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0)
    together = engine.generate(prompts, n=2, sampling=sampling, seed=[5, 6, 7])
    alone = engine.generate(prompts[1:2], n=2, sampling=sampling, seed=[6])
    reordered = engine.generate([prompts[2], prompts[1]], n=2, sampling=sampling, seed=[7, 6])
    ids = [[c.token_ids for c in group] for group in together]
    assert [[c.token_ids for c in group] for group in alone] == ids[1:2]
    assert [[c.token_ids for c in group] for group in reordered] == [ids[2], ids[1]]
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        engine.generate(prompts, n=1, sampling=sampling, seed=[1, 2])
