"""Integration: a tiny random model fitted for 2 SPIRAL / GRPO steps on CPU, end to end.

A random model never writes a correct chain sum, so every reward would be 0 and the update
empty. ``HashRewardTask`` gives each response a deterministic pseudo-random reward in [0, 1]
instead, so advantages are non-zero and every parameter must move.
"""

from __future__ import annotations

import glob
import hashlib
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from spiral_lit.data import ProblemDataModule
from spiral_lit.models import PolicyConfig, TinyModelConfig, build_tiny_policy
from spiral_lit.module import AlgorithmConfig, SpiralModule
from spiral_lit.policy import VerifierConfig
from spiral_lit.prompts import PromptConfig
from spiral_lit.rollout.base import SamplingConfig
from spiral_lit.tasks.base import Problem
from spiral_lit.tasks.chain_sum import ChainSumTask
from spiral_lit.tiny import tokenizer_corpus
from spiral_lit.update import UpdateConfig


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


def _scalars(log_dir: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents*", recursive=True):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


EXPECTED_METRICS = {
    "both": [
        "reward/search", "search/accuracy", "search/majority_accuracy", "zero_signal_fraction",
        "advantage/search_mean", "advantage/search_std", "advantage/search_min", "advantage/search_max",
        "train/loss/search", "train/clip_frac_low", "train/clip_frac_high", "train/approx_kl",
        "train/entropy/search", "length/search", "truncated/search", "tokens/search",
        "time/generate", "time/verify", "time/update", "time/generate_tokens_per_s",
        "train/ratio_dev_first_minibatch", "verify/search_timeouts", "verify/search_errors",
    ],
    "spiral": [
        "reward/aggregation", "sets/score_mean", "sets/score_std",
        "advantage/aggregation_mean", "advantage/aggregation_std", "advantage/aggregation_min",
        "advantage/aggregation_max", "train/loss/aggregation", "train/entropy/aggregation",
        "length/aggregation", "truncated/aggregation", "tokens/aggregation",
        "sets/oracle", "sets/majority", "sets/distinct_answers",
    ],
}  # fmt: skip


@pytest.mark.parametrize("algorithm", ["spiral", "grpo"])
def test_two_steps_change_every_parameter_and_log_every_metric(tiny_dir: str, tmp_path, algorithm: str) -> None:
    task = HashRewardTask(n_terms=2, digits=2)
    module = SpiralModule(
        policy=PolicyConfig(tiny_dir),
        task=task,
        algorithm=AlgorithmConfig(algorithm=algorithm, n_search=4, n_sets=2, set_size=2, n_agg=2),
        update=UpdateConfig(micro_batch_size=8),
        search_sampling=SamplingConfig(max_new_tokens=8),
        aggregation_sampling=SamplingConfig(max_new_tokens=8),
        verifier=VerifierConfig(num_workers=0),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        log_rollouts_every_n_steps=1,
    )
    data = ProblemDataModule(task, batch_size=2, heldout_size=4, eval_batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=TensorBoardLogger(str(tmp_path), name="run"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    trainer.fit(module, datamodule=data)
    unchanged = [n for n, p in module.policy.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged, f"parameters that did not change: {unchanged}"

    scalars = _scalars(str(tmp_path))
    expected = EXPECTED_METRICS["both"] + (EXPECTED_METRICS["spiral"] if algorithm == "spiral" else [])
    missing = [m for m in expected if m not in scalars]
    assert not missing, f"metrics missing from TensorBoard: {missing}"
    assert all(math.isfinite(v) for v in scalars["train/loss"])
    # On-policy sanity (issue 3): sampler and trainer log-probs agree in fp32.
    assert max(scalars["train/ratio_dev_first_minibatch"]) < 1e-3


def test_bf16_weights_train_end_to_end(tiny_dir: str, tmp_path) -> None:
    """``policy.dtype: bfloat16`` on CPU: both roles sample and train (the CPU shared-prefix forward once crashed on
    bf16 rotary, found by benchmarks/memory.py); every parameter moves and the loss stays finite."""
    task = HashRewardTask(n_terms=2, digits=2)
    module = SpiralModule(
        policy=PolicyConfig(tiny_dir, dtype="bfloat16"),
        task=task,
        algorithm=AlgorithmConfig(n_search=4, n_sets=2, set_size=2, n_agg=2),
        update=UpdateConfig(micro_batch_size=8),
        search_sampling=SamplingConfig(max_new_tokens=8),
        aggregation_sampling=SamplingConfig(max_new_tokens=8),
        verifier=VerifierConfig(num_workers=0),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=TensorBoardLogger(str(tmp_path), name="run"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module.configure_model()
    assert {p.dtype for p in module.policy.parameters()} == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    trainer.fit(module, datamodule=ProblemDataModule(task, batch_size=2, heldout_size=4, eval_batch_size=4))
    unchanged = [n for n, p in module.policy.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged, f"parameters that did not change: {unchanged}"
    scalars = _scalars(str(tmp_path))
    assert scalars["train/loss"] and all(math.isfinite(v) for v in scalars["train/loss"])
