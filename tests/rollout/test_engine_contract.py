"""The RolloutEngine contract (rollout/base.py), one suite run against every backend.

Each backend must give ``n`` samples per prompt in input order, the same samples for the same seed (one seed per
prompt makes a prompt's samples independent of the rest of the request), ``model.generate``'s greedy completion,
log-probabilities equal to a training forward at the sampling temperature, and stop on EOS or at the token budget.

The ``vllm`` cases start one engine (~10 s) and are skipped without vLLM; run them with
``OMP_NUM_THREADS=1 python -m pytest -q -m vllm tests/rollout/``. vLLM holds its own copy of
the weights, so checks that steer the policy's forward with hooks, or that build one engine per setting, run on the
in-process backends only. What is particular to one backend stays in its own file (test_kv_cache.py,
test_hf.py, test_vllm_engine.py).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from rollout_checks import (
    VLLM_TEST_ENGINE,
    EOSOnStep,
    chat_prompts,
    eos_ids,
    greedy_reference,
    ids,
    set_noised_weights,
    training_logprobs,
)

from spiral_lit.rollout import Backend, RolloutEngine, SamplingConfig, make_engine

IN_PROCESS: tuple[Backend, ...] = ("kv_cache", "hf")
"""Backends that decode with the policy module itself (hooks on it apply; engines are cheap to build)."""


@pytest.fixture(scope="module")
def policy(loaded_policy):
    """A private copy of the tiny Llama with noised weights (varied traces, no greedy near-ties)."""
    model, tokenizer = loaded_policy
    model = copy.deepcopy(model).eval()
    set_noised_weights(model, {k: v.clone() for k, v in model.named_parameters()}, seed=0)
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts(policy) -> list[list[int]]:
    return chat_prompts(policy[1])


@pytest.fixture(scope="module", params=[*IN_PROCESS, pytest.param("vllm", marks=pytest.mark.vllm)])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "vllm":
        pytest.importorskip("vllm")
    return request.param


@pytest.fixture(scope="module")
def engine(backend: Backend, policy) -> Iterator[RolloutEngine]:
    """One engine per backend for the module. A vLLM engine is left running: its shutdown tears down process-wide
    state that engines started later in the session share (VLLMEngine.close)."""
    model, tokenizer = policy
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # no OpenMP thread pinning on a shared CPU
        yield make_engine(backend, model, tokenizer, 64, VLLM_TEST_ENGINE)


def _in_process_only(backend: Backend, why: str) -> None:
    if backend not in IN_PROCESS:
        pytest.skip(f"{backend}: {why}")


def test_n_samples_per_prompt_grouped_in_input_order(engine, policy, prompts) -> None:
    model, tokenizer = policy
    eos = eos_ids(model, tokenizer)
    out = engine.generate(prompts, n=3, sampling=SamplingConfig(max_new_tokens=8, temperature=1.0), seed=0)
    assert [len(group) for group in out] == [3] * len(prompts)
    for group in out:
        assert len({tuple(c.token_ids) for c in group}) > 1  # n distinct samples, not copies
        for c in group:
            assert 1 <= c.num_tokens <= 8
            assert c.logprobs.shape == (c.num_tokens,) and c.logprobs.dtype == torch.float32
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert not eos & set(c.token_ids[:-1])  # nothing follows an EOS
            stopped = c.token_ids[-1] in eos
            assert c.finish_reason == ("stop" if stopped else "length")
            assert stopped or c.num_tokens == 8
    # Group i belongs to prompt i: prompt i alone gives group i's rows (greedy, so no seed effect).
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    together = engine.generate(prompts, n=2, sampling=greedy, seed=0)
    for prompt, group in zip(prompts, together, strict=True):
        (alone,) = engine.generate([prompt], n=1, sampling=greedy, seed=0)[0]
        assert ids([group]) == [[alone.token_ids, alone.token_ids]]


def test_an_empty_request_gives_no_groups(engine) -> None:
    sampling = SamplingConfig(max_new_tokens=4)
    assert engine.generate([], n=2, sampling=sampling, seed=0) == []
    assert engine.generate([], n=2, sampling=sampling, seed=[]) == []


def test_same_seed_same_samples_other_seed_other(engine, prompts) -> None:
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0)
    first = engine.generate(prompts, n=2, sampling=sampling, seed=123)
    again = engine.generate(prompts, n=2, sampling=sampling, seed=123)
    other = engine.generate(prompts, n=2, sampling=sampling, seed=124)
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)
    for g1, g2 in zip(first, again, strict=True):
        for c1, c2 in zip(g1, g2, strict=True):
            assert c1.finish_reason == c2.finish_reason
            assert torch.equal(c1.logprobs, c2.logprobs)


def test_sampling_leaves_the_global_rng_alone(backend: Backend, engine, prompts) -> None:
    """Rollout draws come from the request's seed alone (docs/algorithm.md §2.5); decoding must not shift the draws
    of anything else that uses torch's global RNG."""
    _in_process_only(backend, "vLLM's sampler advances torch's global RNG (its seeded requests still repeat)")
    rng_before = torch.get_rng_state()
    engine.generate(prompts, n=2, sampling=SamplingConfig(max_new_tokens=8, temperature=1.0), seed=123)
    engine.generate(prompts, n=2, sampling=SamplingConfig(max_new_tokens=8, temperature=1.0), seed=[1, 2, 3, 4])
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_one_seed_per_prompt_makes_a_prompts_samples_independent_of_the_others(engine, prompts) -> None:
    """Evaluation's guarantee (docs/algorithm.md §7.1): a prompt's rollouts do not depend on its batch (up to
    floating point)."""
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0)
    together = ids(engine.generate(prompts, n=2, sampling=sampling, seed=[5, 6, 7, 8]))
    assert ids(engine.generate(prompts[1:2], n=2, sampling=sampling, seed=[6])) == together[1:2]
    assert ids(engine.generate([prompts[3], prompts[1]], n=2, sampling=sampling, seed=[8, 6])) == [
        together[3],
        together[1],
    ]
    assert ids(engine.generate(prompts[:1], n=2, sampling=sampling, seed=[9]))[0] != together[0]
    assert together[0] != together[1]  # nearby seeds do not share noise across prompts
    with pytest.raises(ValueError, match="2 seeds for 4 prompts"):
        engine.generate(prompts, n=1, sampling=sampling, seed=[1, 2])


def test_greedy_equals_model_generate(engine, policy, prompts) -> None:
    model, tokenizer = policy
    out = engine.generate(prompts, n=2, sampling=SamplingConfig(max_new_tokens=12, temperature=0.0), seed=0)
    for prompt, group in zip(prompts, out, strict=True):
        reference = greedy_reference(model, tokenizer, prompt, 12)
        assert ids([group]) == [[reference, reference]]
        stopped = reference[-1] in eos_ids(model, tokenizer)
        assert [c.finish_reason for c in group] == ["stop" if stopped else "length"] * 2
        # At temperature 0 the recorded log-probs are of the untempered distribution.
        (want,) = training_logprobs(model, [prompt], [reference], 1.0)
        for completion in group:
            torch.testing.assert_close(completion.logprobs, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (0.7, 0.9)])
def test_sampler_logprobs_match_a_training_forward(
    backend: Backend, engine, policy, prompts, temperature: float, top_p: float
) -> None:
    if top_p < 1:
        _in_process_only(backend, "reports the renormalised nucleus (test_vllm_engine.py checks it)")
    model, tokenizer = policy
    out = engine.generate(prompts, n=3, sampling=SamplingConfig(10, temperature, top_p), seed=7)
    rows = [(p, c) for p, group in zip(prompts, out, strict=True) for c in group]
    expected = training_logprobs(model, [p for p, _ in rows], [c.token_ids for _, c in rows], temperature)
    for (prompt, completion), want in zip(rows, expected, strict=True):
        assert completion.logprobs.dtype == torch.float32
        # Includes the shorter prompts, which batched backends left-pad.
        torch.testing.assert_close(completion.logprobs, want, atol=1e-4, rtol=0, msg=f"prompt length {len(prompt)}")


def test_eos_gives_stop_and_budget_gives_length(backend: Backend, engine, policy, prompts) -> None:
    _in_process_only(backend, "runs its own copy of the weights, which hooks on the policy do not reach")
    model, tokenizer = policy
    eos = tokenizer.eos_token_id
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


def test_stop_strings_end_a_trace_at_the_token_that_completes_them(engine, policy, prompts) -> None:
    _, tokenizer = policy
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0)
    (free,) = engine.generate(prompts[:1], n=1, sampling=greedy, seed=0)[0]
    assert free.num_tokens >= 6, "the model stopped too early for this test"
    stop = tokenizer.decode(free.token_ids[3:5])
    # The first prefix of the free-running trace that contains the stop string.
    k = next(k for k in range(1, free.num_tokens + 1) if stop in tokenizer.decode(free.token_ids[:k]))
    assert k < free.num_tokens
    stopping = SamplingConfig(max_new_tokens=16, temperature=0.0, stop_strings=["never appears", stop])
    (group,) = engine.generate(prompts[:1], n=2, sampling=stopping, seed=0)
    for completion in group:
        assert completion.token_ids == free.token_ids[:k]
        assert completion.finish_reason == "stop"
        assert completion.text.endswith(stop)
        torch.testing.assert_close(completion.logprobs, free.logprobs[:k])


def test_batch_size_does_not_change_greedy_rollouts(backend: Backend, policy, prompts) -> None:
    _in_process_only(backend, "its batch size is vLLM's scheduler limit, set once per engine (~10 s to start)")
    model, tokenizer = policy
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.0)
    runs = [
        make_engine(backend, model, tokenizer, b).generate(prompts, n=2, sampling=sampling, seed=0) for b in (256, 4, 1)
    ]
    whole = runs[0]
    for out in runs[1:]:
        assert ids(out) == ids(whole)
        assert [[c.finish_reason for c in g] for g in out] == [[c.finish_reason for c in g] for g in whole]
        for g1, g2 in zip(out, whole, strict=True):
            for c1, c2 in zip(g1, g2, strict=True):
                torch.testing.assert_close(c1.logprobs, c2.logprobs, atol=1e-4, rtol=0)


def test_generate_restores_training_mode(engine, policy, prompts) -> None:
    model, _ = policy
    model.train()
    try:
        engine.generate(prompts[:1], n=1, sampling=SamplingConfig(max_new_tokens=2), seed=0)
        assert model.training
    finally:
        model.eval()


def test_outputs_and_model_stay_usable_for_training(engine, policy, prompts) -> None:
    """Decoding may run in inference mode; what it returns, and the model it ran, must still work with autograd."""
    model, _ = policy
    (group,) = engine.generate(prompts[:1], n=2, sampling=SamplingConfig(4), seed=0)
    old_logprobs = group[0].logprobs
    assert not old_logprobs.is_inference()
    ids_T = torch.tensor([prompts[0] + group[0].token_ids])
    completion = ids_T[:, len(prompts[0]) :]
    try:
        logits_TV = model(input_ids=ids_T).logits[0, len(prompts[0]) - 1 : -1]
        new_logprobs = torch.log_softmax(logits_TV, dim=-1).gather(-1, completion.T).squeeze(-1)
        # A product saves old_logprobs for backward, which autograd refuses for inference-mode tensors.
        (new_logprobs * old_logprobs).sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    finally:
        model.zero_grad(set_to_none=True)
