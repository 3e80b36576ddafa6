"""Policy losses and token log-probs (docs/algorithm.md §4) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from spiral_lit.algorithms import loss_normaliser, losses, policy_loss, token_entropy, token_logprobs
from spiral_lit.algorithms.losses import truncated_importance_weights

# A 2-sequence batch, T = 3. Sequence 0 has advantage +1, sequence 1 advantage -1 and one
# padded token. Ratios r = exp(logp - old) chosen by hand (clip range 0.2 / 0.28 -> [0.8, 1.28]):
#   (0,0) r=1.5, A>0: r > 1.28, clip-high ACTIVE   -> -min(1.5, 1.28)   = -1.28, grad 0
#   (0,1) r=0.5, A>0: r < 0.8 but A>0, no clip     -> -min(0.5, 0.8)    = -0.5
#   (0,2) r=1.1, A>0: inside the range             -> -1.1
#   (1,0) r=0.5, A<0: r < 0.8, clip-low ACTIVE     -> -min(-0.5, -0.8)  = +0.8, grad 0
#   (1,1) r=1.5, A<0: r > 1.28 but A<0, no clip    -> -min(-1.5, -1.28) = +1.5
#   (1,2) padding (logprobs -inf): must contribute nothing, and no NaN.
# Sum = -1.28 - 0.5 - 1.1 + 0.8 + 1.5 = -0.58 over 5 kept tokens.
RATIOS = [[1.5, 0.5, 1.1], [0.5, 1.5, 1.0]]
ADV_B = torch.tensor([1.0, -1.0])
MASK_BT = torch.tensor([[True, True, True], [True, True, False]])
OLD_BT = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -math.inf]])


def _logprobs() -> torch.Tensor:
    logp_BT = OLD_BT + torch.tensor(RATIOS).log()
    logp_BT[1, 2] = -math.inf
    return logp_BT.requires_grad_(True)


def test_loss_denominators_per_group() -> None:
    tokens, sequences = torch.tensor([6.0, 0.0, 12.0]), torch.tensor([2.0, 0.0, 3.0])
    assert losses.loss_denominators(tokens, sequences, "token_mean", None).tolist() == [6.0, 0.0, 12.0]
    assert losses.loss_denominators(tokens, sequences, "seq_mean_token_sum_norm", 4).tolist() == [8.0, 0.0, 12.0]
    with pytest.raises(ValueError, match="norm_const"):
        losses.loss_denominators(tokens, sequences, "seq_mean_token_sum_norm", 0.0)


def test_loss_normaliser() -> None:
    assert loss_normaliser(MASK_BT, "token_mean").item() == 5.0
    assert loss_normaliser(MASK_BT, "seq_mean_token_sum_norm", norm_const=4).item() == 8.0  # 2 seqs * 4
    assert loss_normaliser(torch.zeros(2, 3, dtype=torch.bool), "token_mean").item() == 1.0
    with pytest.raises(ValueError, match="norm_const"):
        loss_normaliser(MASK_BT, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="token_mean"):
        loss_normaliser(MASK_BT, "bogus")  # type: ignore[arg-type]


def test_ppo_clip_hand_values_and_gradients() -> None:
    logp_BT = _logprobs()
    loss, stats = policy_loss(logp_BT, OLD_BT, ADV_B, MASK_BT, loss_normaliser(MASK_BT, "token_mean"))
    torch.testing.assert_close(loss, torch.tensor(-0.58 / 5))  # -0.116
    loss.backward()
    # d/dlogp of -r A / 5 is -r A / 5 where the unclipped branch is active, 0 where clipped:
    #   (0,0) clipped 0; (0,1) -0.5/5 = -0.1; (0,2) -1.1/5 = -0.22; (1,0) clipped 0;
    #   (1,1) +1.5/5 = 0.3; (1,2) padding 0.
    expected_grad = torch.tensor([[0.0, -0.1, -0.22], [0.0, 0.3, 0.0]])
    torch.testing.assert_close(logp_BT.grad, expected_grad)
    torch.testing.assert_close(stats["pg_loss"], torch.tensor(-0.116))
    torch.testing.assert_close(stats["clip_frac_high"], torch.tensor(0.2))  # token (0,0) of 5
    torch.testing.assert_close(stats["clip_frac_low"], torch.tensor(0.2))  # token (1,0) of 5
    torch.testing.assert_close(stats["ratio_dev"], torch.tensor(2.1 / 5))  # .5 + .5 + .1 + .5 + .5
    # approx_kl: k3 with x = old - logp = -log r is 1/r + log r - 1:
    #   r=1.5: 0.072132, r=0.5: 0.306853, r=1.1: 0.004401 -> (2*0.072132 + 2*0.306853 + 0.004401)/5
    k3 = [1 / r + math.log(r) - 1 for r in (1.5, 0.5, 1.1, 0.5, 1.5)]
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(sum(k3) / 5))
    assert abs(sum(k3) / 5 - 0.152474) < 1e-6
    assert stats["n_tokens"].item() == 5
    assert not any(v.requires_grad for v in stats.values())


def test_seq_mean_token_sum_norm_reduction() -> None:
    normaliser = loss_normaliser(MASK_BT, "seq_mean_token_sum_norm", norm_const=4)
    loss, _ = policy_loss(_logprobs(), OLD_BT, ADV_B, MASK_BT, normaliser)
    torch.testing.assert_close(loss, torch.tensor(-0.58 / 8))  # -0.0725


def test_reinforce_is_hand_values() -> None:
    # -r A per token, no clipping: -1.5 - 0.5 - 1.1 + 0.5 + 1.5 = -1.1, / 5 = -0.22.
    logp_BT = _logprobs()
    loss, stats = policy_loss(logp_BT, OLD_BT, ADV_B, MASK_BT, 5.0, loss_type="reinforce_is")
    torch.testing.assert_close(loss, torch.tensor(-0.22))
    loss.backward()
    # Gradient r A (grad logp) of the objective, i.e. -r A / 5 for the loss, at every kept token.
    expected_grad = torch.tensor([[-0.3, -0.1, -0.22], [0.1, 0.3, 0.0]])
    torch.testing.assert_close(logp_BT.grad, expected_grad)
    # Clip fractions still report where PPO would have clipped.
    torch.testing.assert_close(stats["clip_frac_high"], torch.tensor(0.2))


def test_seq_weights_kl_and_entropy_terms() -> None:
    # seq weights (2, 0.5): seq 0 sum -2.88 * 2 = -5.76; seq 1 sum 2.3 * 0.5 = 1.15 -> -4.61 / 5.
    loss, _ = policy_loss(_logprobs(), OLD_BT, ADV_B, MASK_BT, 5.0, seq_weights_B=torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(loss, torch.tensor(-4.61 / 5))

    # Reference log-probs log 2 above the policy at every token: k3 = 2 - log 2 - 1 = 0.306853;
    # kl_coef 0.1 adds 0.0306853 per kept token -> +0.0306853 to the token mean. Its gradient
    # w.r.t. logp is kl_coef * (1 - exp(ref - logp)) / 5 = 0.1 * (1 - 2) / 5 = -0.02 per kept token.
    # Entropy 0.5 per token with coef 0.01 subtracts 0.005; padding entropy (100) is masked out.
    logp_BT = _logprobs()
    ref_BT = logp_BT.detach() + math.log(2.0)
    entropy_BT = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 100.0]])
    loss, stats = policy_loss(
        logp_BT,
        OLD_BT,
        ADV_B,
        MASK_BT,
        5.0,
        ref_logprobs_BT=ref_BT,
        kl_coef=0.1,
        entropy_BT=entropy_BT,
        entropy_coef=0.01,
    )
    k3_ref = 2.0 - math.log(2.0) - 1.0
    torch.testing.assert_close(loss, torch.tensor(-0.116 + 0.1 * k3_ref - 0.005))
    torch.testing.assert_close(stats["kl_ref"], torch.tensor(k3_ref))
    torch.testing.assert_close(stats["entropy"], torch.tensor(0.5))
    loss.backward()
    expected_grad = torch.tensor([[0.0, -0.1, -0.22], [0.0, 0.3, 0.0]]) + torch.tensor(
        [[-0.02, -0.02, -0.02], [-0.02, -0.02, 0.0]]
    )
    torch.testing.assert_close(logp_BT.grad, expected_grad)
    assert torch.isfinite(loss)


def test_zero_advantage_and_on_policy() -> None:
    # On-policy (r = 1) with A = 0: loss 0, nothing clipped, no ratio deviation.
    logp_BT = torch.zeros(2, 3, requires_grad=True)
    loss, stats = policy_loss(logp_BT, torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3, dtype=torch.bool), 6.0)
    assert loss.item() == 0.0
    assert stats["clip_frac_low"].item() == stats["clip_frac_high"].item() == stats["ratio_dev"].item() == 0.0


def test_unknown_loss_type() -> None:
    with pytest.raises(ValueError, match="ppo_clip"):
        policy_loss(_logprobs(), OLD_BT, ADV_B, MASK_BT, 5.0, loss_type="bogus")  # type: ignore[arg-type]


@pytest.mark.parametrize("loss_type", ["ppo_clip", "reinforce_is"])
@pytest.mark.parametrize(("reduction", "norm_const"), [("token_mean", None), ("seq_mean_token_sum_norm", 7.0)])
def test_micro_batch_invariance(loss_type: str, reduction: str, norm_const: float | None) -> None:
    gen = torch.Generator().manual_seed(0)
    batch, length = 4, 6
    old_BT = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    logp_BT = old_BT + 0.4 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    ref_BT = old_BT + 0.2 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    entropy_BT = torch.rand(batch, length, generator=gen, dtype=torch.float64)
    adv_B = torch.tensor([1.0, -0.5, 0.25, -1.0], dtype=torch.float64)
    weights_B = torch.tensor([1.0, 0.5, 2.0, 1.0], dtype=torch.float64)
    lengths_B = torch.tensor([6, 2, 4, 1])
    mask_BT = torch.arange(length)[None, :] < lengths_B[:, None]
    normaliser = loss_normaliser(mask_BT, reduction, norm_const)  # whole minibatch
    kwargs = dict(loss_type=loss_type, kl_coef=0.05, entropy_coef=0.01)

    def run(rows: slice, leaf_BT: torch.Tensor) -> torch.Tensor:
        loss, _ = policy_loss(
            leaf_BT[rows],
            old_BT[rows],
            adv_B[rows],
            mask_BT[rows],
            normaliser,
            seq_weights_B=weights_B[rows],
            ref_logprobs_BT=ref_BT[rows],
            entropy_BT=entropy_BT[rows],
            **kwargs,
        )
        return loss

    full_leaf = logp_BT.clone().requires_grad_(True)
    full_loss = run(slice(0, batch), full_leaf)
    full_loss.backward()
    split_leaf = logp_BT.clone().requires_grad_(True)
    # Two uneven micro-batches (1 + 3 sequences), each divided by the whole-minibatch normaliser.
    split_loss = run(slice(0, 1), split_leaf) + run(slice(1, batch), split_leaf)
    split_loss.backward()
    torch.testing.assert_close(split_loss, full_loss)
    torch.testing.assert_close(split_leaf.grad, full_leaf.grad)
    assert full_leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_matches_naive(temperature: float, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    logits_BTV = (3 * torch.randn(3, 5, 11, generator=gen)).to(dtype).requires_grad_(True)
    targets_BT = torch.randint(0, 11, (3, 5), generator=gen)
    logp_BT = token_logprobs(logits_BTV, targets_BT, temperature)
    assert logp_BT.shape == (3, 5) and logp_BT.dtype == torch.float32
    naive_leaf = logits_BTV.detach().float().requires_grad_(True)
    naive_BT = torch.log_softmax(naive_leaf / temperature, dim=-1).gather(-1, targets_BT[..., None]).squeeze(-1)
    torch.testing.assert_close(logp_BT, naive_BT)
    logp_BT.sum().backward()
    naive_BT.sum().backward()
    torch.testing.assert_close(logits_BTV.grad.float(), naive_leaf.grad, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("rows_per_chunk", [1, 2, 3])
def test_token_logprobs_and_entropy_do_not_depend_on_the_chunking(
    rows_per_chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 rows cut 1+1+1, 2+1 or 3 (the chunk budget in bytes of float32 [T, V] rows) give the same values."""
    monkeypatch.setattr(losses, "LOGITS_CHUNK_BYTES", rows_per_chunk * 5 * 11 * 4)
    assert losses._chunk_rows(torch.zeros(3, 5, 11)) == rows_per_chunk
    gen = torch.Generator().manual_seed(2)
    logits_BTV = (3 * torch.randn(3, 5, 11, generator=gen)).requires_grad_(True)
    targets_BT = torch.randint(0, 11, (3, 5), generator=gen)
    logp_BT = token_logprobs(logits_BTV, targets_BT, 0.7)
    logp_BT.sum().backward()
    naive_leaf = logits_BTV.detach().requires_grad_(True)
    naive_BT = torch.log_softmax(naive_leaf / 0.7, dim=-1).gather(-1, targets_BT[..., None]).squeeze(-1)
    naive_BT.sum().backward()
    torch.testing.assert_close(logp_BT, naive_BT)
    torch.testing.assert_close(logits_BTV.grad, naive_leaf.grad)
    expected = torch.distributions.Categorical(logits=logits_BTV.detach() / 0.7).entropy()
    torch.testing.assert_close(token_entropy(logits_BTV.detach(), 0.7), expected)


def test_token_entropy() -> None:
    # Uniform logits over V = 8: entropy log 8 at any temperature.
    torch.testing.assert_close(token_entropy(torch.zeros(2, 3, 8), 0.5), torch.full((2, 3), math.log(8)))
    gen = torch.Generator().manual_seed(1)
    logits_BTV = torch.randn(2, 4, 9, generator=gen)
    expected = torch.distributions.Categorical(logits=logits_BTV / 0.7).entropy()
    torch.testing.assert_close(token_entropy(logits_BTV, 0.7), expected)
    # Empty batch keeps its shape.
    assert token_logprobs(torch.zeros(0, 3, 5), torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3)


def test_token_entropy_of_banned_tokens_is_finite() -> None:
    # Logits [0, 0, -inf]: two equally likely tokens, one banned -> entropy log 2 (not 0 * -inf = NaN);
    # [0, -inf, -inf]: one certain token -> 0.
    inf = float("inf")
    logits_BTV = torch.tensor([[[0.0, 0.0, -inf], [0.0, -inf, -inf]]])
    torch.testing.assert_close(token_entropy(logits_BTV), torch.tensor([[math.log(2), 0.0]]))


# Truncated importance weights (docs/algorithm.md §4.3): raw weights exp(trainer - sampler) chosen by hand, cap 2:
#   (0,0) 0.5  (0,1) 1.0  (0,2) 3.0 -> 2 (clipped)  (1,0) 2.5 -> 2 (clipped)  (1,1) 1.2  (1,2) padding -> 1.
# Kept: 0.5 + 1 + 2 + 2 + 1.2 = 6.7 over 5 tokens -> mean 1.34, max 2, clipped fraction 2/5; mean |log raw weight|
# (|trainer - sampler|) = (log 2 + 0 + log 3 + log 2.5 + log 1.2) / 5 = log(18) / 5 = 0.57807.
RAW_WEIGHTS = [[0.5, 1.0, 3.0], [2.5, 1.2, 1.0]]
TIS_BT = torch.tensor([[0.5, 1.0, 2.0], [2.0, 1.2, 1.0]])


def _sampler_logprobs() -> torch.Tensor:
    sampler_BT = OLD_BT - torch.tensor(RAW_WEIGHTS).log()
    sampler_BT[1, 2] = -math.inf
    return sampler_BT


def test_truncated_importance_weights_hand_values() -> None:
    weights_BT, stats = truncated_importance_weights(OLD_BT, _sampler_logprobs(), MASK_BT, cap=2.0)
    torch.testing.assert_close(weights_BT, TIS_BT)
    torch.testing.assert_close(stats["tis_mean"], torch.tensor(1.34))
    torch.testing.assert_close(stats["tis_max"], torch.tensor(2.0))
    torch.testing.assert_close(stats["tis_clip_frac"], torch.tensor(0.4))
    torch.testing.assert_close(stats["logprob_abs_diff"], torch.tensor(math.log(18.0) / 5))
    assert not weights_BT.requires_grad
    # On-policy (sampler == trainer): every weight is 1, nothing clipped.
    ones_BT, on_policy = truncated_importance_weights(OLD_BT, OLD_BT, MASK_BT, cap=2.0)
    torch.testing.assert_close(ones_BT, torch.ones(2, 3))
    assert on_policy["tis_clip_frac"].item() == 0.0 and on_policy["tis_max"].item() == 1.0
    assert on_policy["logprob_abs_diff"].item() == 0.0
    with pytest.raises(ValueError, match="tis_cap"):
        truncated_importance_weights(OLD_BT, OLD_BT, MASK_BT, cap=0.0)


def test_token_weights_multiply_the_policy_gradient_term() -> None:
    # Per-token ppo_clip terms (see the top of this file) times TIS_BT:
    #   -1.28 * 0.5 - 0.5 * 1 - 1.1 * 2 + 0.8 * 2 + 1.5 * 1.2 = 0.06 over 5 kept tokens.
    logp_BT = _logprobs()
    loss, stats = policy_loss(logp_BT, OLD_BT, ADV_B, MASK_BT, 5.0, token_weights_BT=TIS_BT)
    torch.testing.assert_close(loss, torch.tensor(0.06 / 5))
    torch.testing.assert_close(stats["pg_loss"], torch.tensor(0.06 / 5))
    loss.backward()
    # Unclipped tokens: -r A w / 5 -> (0,1) -0.5/5, (0,2) -1.1*2/5, (1,1) 1.5*1.2/5; clipped tokens stay 0.
    expected_grad = torch.tensor([[0.0, -0.1, -0.44], [0.0, 0.36, 0.0]])
    torch.testing.assert_close(logp_BT.grad, expected_grad)
    # Clip statistics are of the ratio alone, whatever the weights.
    torch.testing.assert_close(stats["clip_frac_high"], torch.tensor(0.2))


def test_token_logprobs_and_entropy_take_one_temperature_per_row() -> None:
    # Row 0 at temperature 1: log softmax([0, ln 3]) = (ln 1/4, ln 3/4); row 1 at 0.5 doubles the logits:
    # log softmax([0, 2 ln 3]) = (ln 1/10, ln 9/10).
    logits_BTV = torch.tensor([[[0.0, math.log(3.0)]], [[0.0, math.log(3.0)]]])
    targets_BT = torch.tensor([[1], [0]])
    logp_BT = token_logprobs(logits_BTV, targets_BT, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(logp_BT, torch.tensor([[math.log(0.75)], [math.log(0.1)]]))
    entropy_BT = token_entropy(logits_BTV, torch.tensor([1.0, 0.5]))
    h = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) for p in (0.25, 0.1)]
    torch.testing.assert_close(entropy_BT, torch.tensor([[h[0]], [h[1]]]))
