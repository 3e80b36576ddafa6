"""Pure sampling functions of the rollout engine: temperature, top-p, log-probabilities.

Sampling is inverse-CDF with one uniform number per (row, step), drawn up front by the
caller from an explicit ``torch.Generator``. A row's token then depends only on its own
logits and its own uniform, not on which other rows share the batch, so batch
compaction and chunking cannot change what a row samples (up to the floating-point
effects of batch size on the logits themselves; see :mod:`spiral_lit.rollout.kv_cache`).
"""

from __future__ import annotations

import torch


def draw_uniforms(num_prompts: int, n: int, steps: int, seed: int | list[int]) -> torch.Tensor:
    """Uniforms ``[num_prompts * n, steps]`` for inverse-CDF sampling; row ``i * n + j`` is (prompt i, sample j).

    An int seeds one generator for the whole request; a list gives prompt i its own generator
    seeded with ``seed[i]``, so its rows do not depend on the other prompts of the request.
    """
    if isinstance(seed, int):
        return torch.rand((num_prompts * n, steps), generator=torch.Generator().manual_seed(seed))
    if len(seed) != num_prompts:
        raise ValueError(f"got {len(seed)} seeds for {num_prompts} prompts; give one per prompt or an int")
    if not seed:
        return torch.empty((0, steps))
    return torch.cat([torch.rand((n, steps), generator=torch.Generator().manual_seed(s)) for s in seed])


def sampler_logprobs(logits_BV: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) in float32, T = 1 for greedy: the quantity the trainer recomputes."""
    return torch.log_softmax(logits_BV.float() / (temperature if temperature > 0 else 1.0), dim=-1)


def _inverse_cdf(probs_BV: torch.Tensor, uniforms_B: torch.Tensor) -> torch.Tensor:
    """Index of the first cumulative probability above ``u * total`` per row; never a zero-probability entry."""
    cdf_BV = probs_BV.cumsum(dim=-1)
    target_B1 = uniforms_B.to(cdf_BV.dtype).unsqueeze(-1) * cdf_BV[:, -1:]
    index_B = torch.searchsorted(cdf_BV, target_B1, right=True).squeeze(-1).clamp_(max=probs_BV.shape[-1] - 1)
    # u * total can round up to total, which would select the (possibly zero-probability) last entry.
    picked_ok_B = probs_BV.gather(-1, index_B.unsqueeze(-1)).squeeze(-1) > 0
    return torch.where(picked_ok_B, index_B, probs_BV.argmax(dim=-1))


def sample_tokens(
    logits_BV: torch.Tensor, uniforms_B: torch.Tensor, temperature: float, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens ``[B]`` and their sampler log-probabilities ``[B]`` (float32).

    ``temperature == 0`` is greedy (``uniforms_B`` unused). The returned log-probability is
    of the full tempered distribution, before the top-p cut (as :mod:`spiral_lit.rollout.hf`
    records it), since that is what the trainer's importance ratio recomputes.
    """
    logp_BV = sampler_logprobs(logits_BV, temperature)
    if temperature == 0:
        tokens_B = logits_BV.argmax(dim=-1)
    elif top_p >= 1.0:
        tokens_B = _inverse_cdf(logp_BV.exp(), uniforms_B)
    else:
        probs_BV, order_BV = logp_BV.exp().sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV
        probs_BV = probs_BV.masked_fill(mass_before_BV >= top_p, 0.0)
        tokens_B = order_BV.gather(-1, _inverse_cdf(probs_BV, uniforms_B).unsqueeze(-1)).squeeze(-1)
    return tokens_B, logp_BV.gather(-1, tokens_B.unsqueeze(-1)).squeeze(-1)
