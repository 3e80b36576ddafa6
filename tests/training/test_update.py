"""update.py: length-bucketed micro-batches give the loss and gradients of one padded batch (docs/algorithm.md
§8.2); with ``tis_cap`` (§4.3) the truncated importance weight scales each token's policy gradient."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from spiral_lit.rollout import Completion
from spiral_lit.training.batching import length_buckets
from spiral_lit.training.update import PolicyUpdater, TrainSequence, UpdateConfig
from spiral_lit.training.update_config import resolve_for_precision


@pytest.fixture(scope="module")
def sequences(tiny_policy) -> list[TrainSequence]:
    """Seven traces of 6-60 tokens on prompts of 3-40 tokens, with old log-probs off-policy enough to clip."""
    g = torch.Generator().manual_seed(0)
    vocab = tiny_policy.model.config.vocab_size
    out = []
    for i, (prompt_len, completion_len) in enumerate([(40, 6), (3, 60), (12, 25), (25, 9), (7, 33), (30, 48), (5, 14)]):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        ids = torch.randint(3, vocab, (completion_len,), generator=g).tolist()
        old = -torch.rand(completion_len, generator=g) * 8.0  # far from the model's own: ratios clip
        completion = Completion(token_ids=ids, logprobs=old, finish_reason="length", text="")
        out.append(TrainSequence(prompt, completion, advantage=float(torch.randn(1, generator=g)), role=i % 2))
    return out


def _update(model, sequences, config: UpdateConfig) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One optimiser step's statistics and the gradient it would apply."""
    grads: dict[str, torch.Tensor] = {}

    def step() -> None:
        grads.update({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})

    model.zero_grad(set_to_none=True)
    updater = PolicyUpdater(
        model, config, pad_id=0, temperature=0.8, reduce_sum=lambda x: x, reduce_max=lambda x: x, world_size=1
    )
    try:
        stats = updater.update(sequences, lambda loss: loss.backward(), step, torch.device("cpu"), seed=0)
    finally:
        model.zero_grad(set_to_none=True)
    return stats, grads


@pytest.mark.parametrize(
    ("loss_type", "reduction", "entropy_coef"),
    [
        ("ppo_clip", "token_mean", 0.0),
        ("reinforce_is", "seq_mean_token_sum_norm", 0.0),
        ("ppo_clip", "token_mean", 0.1),
    ],
)
def test_bucketed_micro_batches_match_one_padded_batch(
    tiny_policy, sequences, loss_type: str, reduction: str, entropy_coef: float
) -> None:
    model = tiny_policy.model
    common = {"loss_type": loss_type, "reduction": reduction, "norm_const": 64.0, "entropy_coef": entropy_coef}
    lengths = [len(s.prompt_ids) + s.completion.num_tokens for s in sequences]
    assert len(length_buckets(lengths, 2)) == 4
    assert len(length_buckets(lengths, 32, max_tokens=120)) >= 3

    padded_stats, padded_grads = _update(model, sequences, UpdateConfig(micro_batch_size=32, **common))
    assert padded_stats["clip_frac_low"] + padded_stats["clip_frac_high"] > 0 or loss_type != "ppo_clip"
    for config in (
        UpdateConfig(micro_batch_size=2, **common),
        UpdateConfig(micro_batch_size=32, micro_batch_tokens=120, **common),
    ):
        stats, grads = _update(model, sequences, config)
        assert stats["loss"] == pytest.approx(padded_stats["loss"], abs=1e-5)
        assert grads.keys() == padded_grads.keys() and len(grads) == len(list(model.parameters()))
        for name, grad in grads.items():
            torch.testing.assert_close(grad, padded_grads[name], atol=1e-5, rtol=0, msg=name)


# ------------------------------------------------------------- truncated importance weights (docs/algorithm.md §4.3)
def _tis_sequences(
    vocab: int, sampler_shift: float, trainer_logprobs: list[torch.Tensor] | None
) -> list[TrainSequence]:
    """Four traces; the sampler's log-probs are the trainer's plus ``sampler_shift`` (random when not given)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i, (prompt_len, completion_len) in enumerate([(9, 5), (4, 12), (15, 7), (6, 3)]):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        ids = torch.randint(3, vocab, (completion_len,), generator=g).tolist()
        logprobs = trainer_logprobs[i] + sampler_shift if trainer_logprobs else -torch.rand(completion_len) * 5
        completion = Completion(token_ids=ids, logprobs=logprobs, finish_reason="length", text="")
        out.append(TrainSequence(prompt, completion, advantage=(-1.0) ** i * (1 + i / 4), role=i % 2))
    return out


@pytest.mark.parametrize("minibatches", [1, 2], ids=["old_from_the_forward", "recomputed"])
def test_importance_weight_scales_the_gradient_and_is_logged(tiny_policy, minibatches: int) -> None:
    """One optimiser step per update takes the old log-probs from its own forward; more steps recompute them first
    (a separate no-grad pass). Both weight the gradient and log alike."""
    model = tiny_policy.model
    vocab = model.config.vocab_size
    # The trainer's own old log-probs, read back after a recompute (two minibatches: the separate pass).
    probe = _tis_sequences(vocab, 0.0, None)
    _update(model, probe, UpdateConfig(recompute_old_logprobs=True, micro_batch_size=2, num_minibatches=2))
    trainer = [copy.deepcopy(s.completion.logprobs) for s in probe]

    def run(shift: float, cap: float | None) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        config = UpdateConfig(recompute_old_logprobs=True, tis_cap=cap, micro_batch_size=2, num_minibatches=minibatches)
        return _update(model, _tis_sequences(vocab, shift, trainer), config)

    plain_stats, plain = run(0.0, None)
    assert "tis_mean" not in plain_stats
    on_policy_stats, on_policy = run(0.0, 2.0)  # sampler == trainer: weight 1 everywhere
    assert on_policy_stats["tis_mean"] == pytest.approx(1.0, abs=1e-6)
    assert on_policy_stats["tis_clip_frac"] == 0.0
    # The sampler found every token twice as likely as the trainer does: weight exp(-log 2) = 0.5 per token.
    half_stats, half = run(math.log(2.0), 2.0)
    assert half_stats["tis_mean"] == pytest.approx(0.5, abs=1e-6)
    assert half_stats["tis_max"] == pytest.approx(0.5, abs=1e-6)
    assert half_stats["logprob_abs_diff"] == pytest.approx(math.log(2.0), abs=1e-5)
    # The sampler found every token 4x less likely: raw weight 4, truncated to the cap 3.
    capped_stats, capped = run(-math.log(4.0), 3.0)
    assert capped_stats["tis_mean"] == pytest.approx(3.0, abs=1e-5)
    assert capped_stats["tis_clip_frac"] == 1.0
    assert plain.keys() == half.keys() == capped.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(on_policy[name], grad, atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(half[name], 0.5 * grad, atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(capped[name], 3.0 * grad, atol=1e-6, rtol=1e-5, msg=name)


def test_tis_cap_needs_recomputed_old_logprobs() -> None:
    with pytest.raises(ValueError, match="recompute_old_logprobs"):
        UpdateConfig(tis_cap=2.0, recompute_old_logprobs=False)
    with pytest.raises(ValueError, match="tis_cap"):
        UpdateConfig(tis_cap=0.0, recompute_old_logprobs=True)


def test_precision_decides_the_old_logprobs_unless_set() -> None:
    """16-bit precision: the trainer's own old log-probs and TIS (cap 2 unless set); fp32: the sampler's; an explicit
    choice always stands."""
    unset = UpdateConfig()
    assert resolve_for_precision(unset, "32-true").recompute_old_logprobs is False
    for precision in ("bf16-mixed", "bf16-true", "16-mixed"):
        resolved = resolve_for_precision(unset, precision)
        assert resolved.recompute_old_logprobs is True and resolved.tis_cap == 2.0
    assert resolve_for_precision(UpdateConfig(tis_cap=5.0), "bf16-mixed").tis_cap == 5.0
    explicit_off = UpdateConfig(recompute_old_logprobs=False)
    assert resolve_for_precision(explicit_off, "bf16-mixed") is explicit_off
    explicit_on = UpdateConfig(recompute_old_logprobs=True)
    assert resolve_for_precision(explicit_on, "32-true").tis_cap is None


# ----------------------------------------------------------------- sampling temperature per role
def test_each_role_is_rescored_at_its_own_sampling_temperature(tiny_policy) -> None:
    """Search traces sampled at 1.0 and aggregation traces at 0.6: on the first (on-policy) minibatch the trainer's
    log-probs equal the sampler's, so every ratio is 1; scoring all at the search temperature is off."""
    from spiral_lit.rollout import SamplingConfig, make_engine

    model, tokenizer = tiny_policy.model, tiny_policy.tokenizer
    engine = make_engine("kv_cache", model, tokenizer)
    prompts = [tokenizer("12 + 34 + 56 =")["input_ids"], tokenizer("7 + 8 =")["input_ids"]]
    sequences = []
    for role, temperature in enumerate((1.0, 0.6)):
        traces = engine.generate(prompts, 3, SamplingConfig(max_new_tokens=12, temperature=temperature), seed=role)
        for prompt, completions in zip(prompts, traces, strict=True):
            sequences += [TrainSequence(prompt, c, advantage=1.0, role=role) for c in completions]

    def ratio_dev(temperature: float | tuple[float, float]) -> float:
        updater = PolicyUpdater(model, UpdateConfig(), 0, temperature, lambda x: x, lambda x: x, world_size=1)
        stats = updater.update(sequences, lambda loss: loss.backward(), lambda: None, torch.device("cpu"), seed=0)
        model.zero_grad(set_to_none=True)
        return stats["ratio_dev_first_minibatch"]

    per_role = ratio_dev((1.0, 0.6))
    assert per_role < 1e-4
    assert ratio_dev(1.0) > 100 * per_role + 0.01  # 0.04 on this random tiny model; 0.1-0.3 on a trained one


# ----------------------------------------------------------------- the two roles in one update
def _with_advantage(sequences: list[TrainSequence], role: int, advantage: float) -> list[TrainSequence]:
    return [
        TrainSequence(s.prompt_ids, s.completion, advantage if s.role == role else s.advantage, s.role)
        for s in sequences
    ]


def test_per_role_normalisation_is_the_weighted_sum_of_each_roles_own_mean(tiny_policy, sequences) -> None:
    model = tiny_policy.model
    weights = {"search_weight": 0.7, "aggregation_weight": 1.5}
    _, per_role = _update(model, sequences, UpdateConfig(role_normalisation="per_role", **weights))
    expected: dict[str, torch.Tensor] = {}
    for role, weight in ((0, 0.7), (1, 1.5)):
        alone = [s for s in sequences if s.role == role]  # one role alone: the shared mean is the role's own mean
        _, grads = _update(model, alone, UpdateConfig())
        for name, grad in grads.items():
            expected[name] = expected.get(name, torch.zeros_like(grad)) + weight * grad
    for name, grad in per_role.items():
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_role_gradient_norms_and_clip_rate(tiny_policy, sequences) -> None:
    model = tiny_policy.model
    stats, grads = _update(model, sequences, UpdateConfig(max_grad_norm=1e-9))
    total = torch.sqrt(sum(g.double().square().sum() for g in grads.values()))
    assert stats["grad_norm/total"] == pytest.approx(float(total), rel=1e-6)
    # Zero advantages for the aggregation traces leave the search role's gradient alone (same normaliser).
    _, search_only = _update(model, _with_advantage(sequences, 1, 0.0), UpdateConfig())
    search = torch.sqrt(sum(g.double().square().sum() for g in search_only.values()))
    assert stats["grad_norm/search"] == pytest.approx(float(search), rel=1e-5)
    assert stats["grad_norm/aggregation"] > 0
    assert stats["clip_rate"] == 1.0
    assert _update(model, sequences, UpdateConfig(max_grad_norm=1e9))[0]["clip_rate"] == 0.0
    tokens = [s.completion.num_tokens for s in sequences]
    search_tokens = sum(t for t, s in zip(tokens, sequences, strict=True) if s.role == 0)
    assert stats["normaliser_share/search"] == pytest.approx(search_tokens / sum(tokens))


def test_running_the_roles_apart_changes_no_gradient(tiny_policy, sequences) -> None:
    _, apart = _update(tiny_policy.model, sequences, UpdateConfig(role_grad_norms=True, micro_batch_size=3))
    _, mixed = _update(tiny_policy.model, sequences, UpdateConfig(role_grad_norms=False, micro_batch_size=3))
    for name, grad in apart.items():
        torch.testing.assert_close(grad, mixed[name], atol=1e-6, rtol=1e-5, msg=name)


def test_statistics_average_over_every_minibatch_and_epoch(tiny_policy, sequences) -> None:
    """With 2 epochs of 2 minibatches (4 optimiser steps) each statistic is the weighted mean over all four, not
    the last minibatch's: the search share of the normaliser is the plain mean of the four minibatches' shares."""
    config = UpdateConfig(micro_batch_size=3, epochs=2, num_minibatches=2)
    steps: list[int] = []
    updater = PolicyUpdater(tiny_policy.model, config, 0, 0.8, lambda x: x, lambda x: x, world_size=1)
    stats = updater.update(sequences, lambda loss: loss.backward(), lambda: steps.append(1), torch.device("cpu"), 5)
    tiny_policy.model.zero_grad(set_to_none=True)
    assert len(steps) == 4
    order, rng, shares = list(range(len(sequences))), random.Random(5), []
    for _ in range(2):  # the updater's shuffle, replayed
        rng.shuffle(order)
        for m in range(2):
            chosen = [sequences[i] for i in order[m::2]]
            search = sum(s.completion.num_tokens for s in chosen if s.role == 0)
            shares.append(search / sum(s.completion.num_tokens for s in chosen))
    assert stats["normaliser_share/search"] == pytest.approx(sum(shares) / 4, rel=1e-6)
    assert {"ratio_dev", "ratio_dev_first_minibatch", "grad_norm/total"} <= stats.keys()
