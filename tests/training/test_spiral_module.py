"""Integration: a tiny random model fitted for 2 SPIRAL / GRPO steps on CPU, end to end.

A random model never writes a correct chain sum, so every reward would be 0 and the update
empty. ``HashRewardTask`` gives each response a deterministic pseudo-random reward in [0, 1]
instead, so advantages are non-zero and every parameter must move.
"""

from __future__ import annotations

import hashlib
import logging
import math

import pytest
import torch
from fit_helpers import fit_moving_every_parameter, tensorboard_scalars

from spiral_lit.prompts import PromptConfig
from spiral_lit.rollout.base import SamplingConfig
from spiral_lit.runtime.models import PolicyConfig, TinyModelConfig, build_tiny_policy
from spiral_lit.runtime.policy import VerifierConfig
from spiral_lit.scaffolds import _shown, sample_search
from spiral_lit.tasks.base import Problem
from spiral_lit.tasks.chain_sum import ChainSumTask
from spiral_lit.tools.tiny import tokenizer_corpus
from spiral_lit.training.data import ProblemDataModule
from spiral_lit.training.spiral_module import AlgorithmConfig, SpiralModule
from spiral_lit.training.update import UpdateConfig


class HashRewardTask(ChainSumTask):
    """Chain sums whose 'verifier' rewards any response pseudo-randomly (test only)."""

    def extract_answer(self, response: str) -> str | None:
        return response

    def score(self, extracted_answer: str, problem: Problem) -> float:
        digest = hashlib.sha256(f"{problem.uid}/{extracted_answer}".encode()).digest()
        return float(digest[0] % 2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("tiny")
    task = ChainSumTask(n_terms=2, digits=2)
    build_tiny_policy(
        out,
        tokenizer_corpus(task, PromptConfig(), 200),
        TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2),
    )
    return str(out)


EXPECTED_METRICS = {
    "both": [
        "reward/search", "search/accuracy", "search/majority_accuracy", "zero_signal_fraction",
        "advantage/search_mean", "advantage/search_std", "advantage/search_min", "advantage/search_max",
        "train/loss/search", "train/clip_frac_low", "train/clip_frac_high", "train/approx_kl",
        "train/entropy/search", "length/search", "truncated/search", "tokens/search",
        "time/generate", "time/verify", "time/update", "time/generate_tokens_per_s",
        "train/ratio_dev_first_minibatch", "verify/search_timeouts", "verify/search_errors", "verify/search_rejected",
        "train/grad_norm/search", "train/grad_norm/total", "train/clip_rate", "train/normaliser_share/search",
        "train/prompts_drawn", "train/prompts_kept", "train/refill_batches",
    ],
    "spiral": [
        "reward/aggregation", "sets/score_mean", "sets/score_std",
        "advantage/aggregation_mean", "advantage/aggregation_std", "advantage/aggregation_min",
        "advantage/aggregation_max", "train/loss/aggregation", "train/entropy/aggregation",
        "length/aggregation", "truncated/aggregation", "tokens/aggregation",
        "sets/oracle", "sets/majority", "sets/distinct_answers", "train/grad_norm/aggregation",
    ],
}  # fmt: skip


def _tiny_module(
    tiny_dir: str, algorithm: str, dtype: str = "float32", train_rounds: int = 1, backend: str = "kv_cache"
) -> SpiralModule:
    """The tiny policy on ``HashRewardTask`` at a small SPIRAL/GRPO shape, 8-token traces, a large learning rate."""
    return SpiralModule(
        policy=PolicyConfig(tiny_dir, dtype=dtype),
        task=HashRewardTask(n_terms=2, digits=2),
        algorithm=AlgorithmConfig(
            algorithm=algorithm, n_search=4, n_sets=2, set_size=2, n_agg=2, train_rounds=train_rounds
        ),
        update=UpdateConfig(micro_batch_size=8),
        search_sampling=SamplingConfig(max_new_tokens=8),
        aggregation_sampling=SamplingConfig(max_new_tokens=8),
        verifier=VerifierConfig(num_workers=0),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        log_rollouts_every_n_steps=1,
        rollout_backend=backend,
    )


def _data(module: SpiralModule) -> ProblemDataModule:
    return ProblemDataModule(module.task, batch_size=2, heldout_size=4, eval_batch_size=4)


@pytest.mark.parametrize("algorithm", ["spiral", "grpo"])
def test_two_steps_change_every_parameter_and_log_every_metric(tiny_dir: str, tmp_path, algorithm: str) -> None:
    module = _tiny_module(tiny_dir, algorithm)
    scalars = fit_moving_every_parameter(module, _data(module), str(tmp_path), max_steps=2)
    expected = EXPECTED_METRICS["both"] + (EXPECTED_METRICS["spiral"] if algorithm == "spiral" else [])
    missing = [m for m in expected if m not in scalars]
    assert not missing, f"metrics missing from TensorBoard: {missing}"
    assert all(math.isfinite(v) for v in scalars["train/loss"])
    # On-policy sanity (docs/algorithm.md §4.1): sampler and trainer log-probs agree in fp32.
    assert max(scalars["train/ratio_dev_first_minibatch"]) < 1e-3


@pytest.mark.parametrize("backend", ["kv_cache", "hf"])  # vllm: tests/rollout/test_vllm_engine.py
def test_two_trained_rounds_fit_end_to_end(tiny_dir: str, tmp_path, backend: str) -> None:
    """``train_rounds: 2`` (docs/algorithm.md §10): every parameter moves, each round's reward is logged, and the
    sampler's and trainer's log-probs agree for round 2's traces as for the others."""
    module = _tiny_module(tiny_dir, "spiral", train_rounds=2, backend=backend)
    scalars = fit_moving_every_parameter(module, _data(module), str(tmp_path), max_steps=2)
    missing = [m for m in [*EXPECTED_METRICS["spiral"], "reward/aggregation_round1", "reward/aggregation_round2"]
               if m not in scalars]  # fmt: skip
    assert not missing, f"metrics missing from TensorBoard: {missing}"
    assert scalars["reward/aggregation"] == scalars["reward/aggregation_round2"]
    assert max(scalars["train/ratio_dev_first_minibatch"]) < 1e-3
    # 2 prompts x (4 search + 2 rounds x 2 sets x 2 aggregations) = 24 sequences per step, less dropped prompts.
    assert set(scalars["train/sequences"]) <= {0.0, 12.0, 24.0} and max(scalars["train/sequences"]) == 24.0


def test_round_two_aggregates_sets_of_round_one_traces(tiny_dir: str) -> None:
    module = _tiny_module(tiny_dir, "spiral", train_rounds=2)
    module.configure_model()
    assert module.runtime is not None
    sampler, batch = module.runtime.sampler, [module.task.problem(i, "train") for i in range(2)]
    search = sample_search(sampler.engine, sampler.renderer, batch, 4, module.search_sampling, 1)
    round1, round2 = module.algorithm.aggregate(sampler, batch, search, lambda phase: phase)
    assert round2.sets_BKS.shape == (2, 2, 2) and int(round2.sets_BKS.max()) < 4  # round 1 has 2 sets x 2 traces
    for b in range(2):
        previous = [t for per_set in round1.traces[b] for t in per_set]  # set-major, as the sets index them
        for k in range(2):
            prompt = module.runtime.tokenizer.decode(round2.prompts[b][k])
            assert all(_shown(sampler.renderer, previous[int(i)]) in prompt for i in round2.sets_BKS[b, k])
    assert [len(per_set) for per_problem in round2.traces for per_set in per_problem] == [2, 2, 2, 2]


def test_bf16_weights_train_end_to_end(tiny_dir: str, tmp_path) -> None:
    """``policy.dtype: bfloat16`` on CPU: both roles sample and train (the CPU shared-prefix forward once crashed on
    bf16 rotary, found by benchmarks/memory.py); every parameter moves and the loss stays finite."""
    module = _tiny_module(tiny_dir, "spiral", dtype="bfloat16")
    scalars = fit_moving_every_parameter(module, _data(module), str(tmp_path), max_steps=2)
    assert {p.dtype for p in module.policy.parameters()} == {torch.bfloat16}
    assert scalars["train/loss"] and all(math.isfinite(v) for v in scalars["train/loss"])


def test_bf16_mixed_precision_trains_with_the_trainers_old_logprobs(tiny_dir: str, tmp_path, caplog) -> None:
    """``trainer.precision: bf16-mixed``: fp32 master weights, rollouts and update under bf16 autocast on the fast
    paths (fused decode, fused shared-prefix forward); the update recomputes old log-probs and applies truncated
    importance weights by default, logging how far sampler and trainer disagree (bf16 rounding: small)."""
    module = _tiny_module(tiny_dir, "spiral")
    with caplog.at_level(logging.WARNING):
        scalars = fit_moving_every_parameter(module, _data(module), str(tmp_path), max_steps=2, precision="bf16-mixed")
    assert not [r for r in caplog.records if "not used" in r.getMessage()]  # no fast path fell back
    assert {p.dtype for p in module.policy.parameters()} == {torch.float32}
    assert module._updater().config.recompute_old_logprobs and module._updater().config.tis_cap == 2.0
    assert module._updater()._forward.path == "fused_prefix"
    assert all(math.isfinite(v) for v in scalars["train/loss"])
    assert 0.0 < max(scalars["train/logprob_abs_diff"]) < 0.05
    assert max(scalars["train/ratio_dev_first_minibatch"]) < 1e-3  # the trainer's own old log-probs


def test_dynamic_sampling_refills_the_batch(tiny_policy, tmp_path) -> None:
    """Half of the prompts have no signal: each update waits for refill batches until it holds ``batch_size`` kept
    prompts (or the bound), and logs how many prompts were drawn and kept."""
    from tiny_run import HalfSignalTask, make_module
    from tiny_run import fit as fit_with_checkpoints

    algorithm = AlgorithmConfig(n_search=4, n_sets=2, set_size=2, n_agg=2)
    assert algorithm.max_refill_batches >= 1  # refill is on by default
    module = make_module(tiny_policy.path, HalfSignalTask(n_terms=2, digits=2), algorithm=algorithm)
    fit_with_checkpoints(tmp_path, module, 3)
    scalars = tensorboard_scalars(str(tmp_path / "tb"))
    drawn, kept, refills = (scalars[f"train/{k}"] for k in ("prompts_drawn", "prompts_kept", "refill_batches"))
    assert sum(w == 0.0 for w in scalars["train/waiting_for_refill"]) == 3  # three updates
    for d, k, r in zip(drawn, kept, refills, strict=True):
        assert k >= 2 or r == algorithm.max_refill_batches  # batch_size 2 kept prompts, or the bound
        assert d == 2 * (r + 1) and k <= d
    assert max(refills) >= 1


def test_rollout_seeds_change_with_every_batch_also_while_waiting_for_a_refill(tiny_policy, tmp_path) -> None:
    import lightning as L
    from tiny_run import HalfSignalTask, make_module
    from tiny_run import fit as fit_with_checkpoints

    class Seeds(L.Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[int, int]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            self.seen.append((trainer.global_step, pl_module._step_seed(1)))

    algorithm = AlgorithmConfig(n_search=4, n_sets=2, set_size=2, n_agg=2, max_refill_batches=2)
    module = make_module(tiny_policy.path, HalfSignalTask(n_terms=2, digits=2), algorithm=algorithm)
    seeds = Seeds()
    fit_with_checkpoints(tmp_path, module, 2, callbacks=[seeds])
    steps = [step for step, _ in seeds.seen]
    assert len(set(steps)) < len(steps)  # some batches waited for a refill at the same global step
    assert len({seed for _, seed in seeds.seen}) == len(seeds.seen)
