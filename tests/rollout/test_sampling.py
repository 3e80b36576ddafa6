"""rollout/sampling.py: inverse-CDF sampling with given uniforms, top-p, log-probabilities (hand-computed)."""

from __future__ import annotations

import math

import pytest
import torch

from spiral_lit.rollout.sampling import draw_uniforms, sample_tokens


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


def test_inverse_cdf_picks_the_token_whose_interval_holds_the_uniform() -> None:
    # Vocabulary order [0.2, 0.5, 0.3]: intervals [0, .2) -> 0, [.2, .7) -> 1, [.7, 1) -> 2.
    logits = _logits([0.2, 0.5, 0.3]).expand(6, -1)
    uniforms = torch.tensor([0.0, 0.19, 0.2, 0.69, 0.71, 1.0 - 1e-7])
    tokens, logp = sample_tokens(logits, uniforms, temperature=1.0, top_p=1.0)
    assert tokens.tolist() == [0, 0, 1, 1, 2, 2]
    torch.testing.assert_close(logp, torch.tensor([0.2, 0.2, 0.5, 0.5, 0.3, 0.3]).log())


def test_top_p_keeps_the_smallest_prefix_reaching_p_and_renormalises() -> None:
    # Sorted: 0.5 (token 1), 0.3 (token 2), 0.2 (token 0); top_p 0.6 keeps tokens 1 and 2 -> [0.625, 0.375].
    logits = _logits([0.2, 0.5, 0.3]).expand(4, -1)
    uniforms = torch.tensor([0.0, 0.62, 0.63, 1.0 - 1e-7])
    tokens, logp = sample_tokens(logits, uniforms, temperature=1.0, top_p=0.6)
    assert tokens.tolist() == [1, 1, 2, 2]
    # The log-probability is of the full tempered distribution, before the cut (what the trainer recomputes).
    torch.testing.assert_close(logp, torch.tensor([0.5, 0.5, 0.3, 0.3]).log())


def test_temperature_scales_logits_and_zero_is_greedy() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    tokens, logp = sample_tokens(logits, torch.tensor([0.99]), temperature=0.0, top_p=1.0)
    assert tokens.tolist() == [1]
    assert logp.item() == torch.log_softmax(logits, -1)[0, 1].item()
    # T = 0.5: scaled logits [2, 6, 4], probabilities [.016, .867, .117]; u = 0.99 falls in token 2's interval.
    tokens, logp = sample_tokens(logits, torch.tensor([0.99]), temperature=0.5, top_p=1.0)
    assert tokens.tolist() == [2]
    assert logp.item() == pytest.approx(4.0 - math.log(math.exp(2.0) + math.exp(6.0) + math.exp(4.0)), abs=1e-6)


def test_never_samples_a_zero_probability_token() -> None:
    logits = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")]]).expand(3, -1)
    tokens, _ = sample_tokens(logits, torch.tensor([0.0, 0.5, 1.0 - 1e-9]), temperature=1.0, top_p=1.0)
    assert set(tokens.tolist()) <= {0, 2}
    tokens, _ = sample_tokens(logits, torch.tensor([0.0, 0.5, 1.0 - 1e-9]), temperature=1.0, top_p=0.3)
    assert tokens.tolist() == [0, 0, 0]


def test_frequencies_follow_the_distribution() -> None:
    probs = torch.tensor([0.1, 0.6, 0.3])
    uniforms = torch.rand(20_000, generator=torch.Generator().manual_seed(0))
    tokens, _ = sample_tokens(probs.log().expand(20_000, -1), uniforms, temperature=1.0, top_p=1.0)
    torch.testing.assert_close(torch.bincount(tokens, minlength=3) / 20_000, probs, atol=0.015, rtol=0)


def test_uniforms_with_one_seed_per_prompt_come_from_each_prompts_own_generator() -> None:
    together = draw_uniforms(3, 2, 5, [11, 22, 33])
    assert together.shape == (6, 5)
    for i, seed in enumerate([11, 22, 33]):
        alone = torch.rand((2, 5), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(together[2 * i : 2 * i + 2], alone)  # rows of prompt i, whatever the others are
    assert torch.equal(draw_uniforms(2, 3, 4, 7), torch.rand((6, 4), generator=torch.Generator().manual_seed(7)))
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        draw_uniforms(3, 1, 4, [1, 2])
