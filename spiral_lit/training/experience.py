"""Phase 5 glue: turn scored rollouts into credited training sequences, and summarise them.

SPIRAL (docs/algorithm.md §3): every search trace carries its set-RL advantage, every
aggregation trace its advantage against its set siblings. GRPO (§5): search
traces only, reward minus group mean. Prompts dropped by dynamic sampling contribute
no sequence.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch

from spiral_lit.evaluation.metrics import gather_sets, set_diagnostics
from spiral_lit.rollout.base import Completion
from spiral_lit.scaffolds import AggregationRollout, SearchRollout
from spiral_lit.training.update import TrainSequence


def search_sequences(search: SearchRollout, adv_BN: torch.Tensor, keep_B: torch.Tensor) -> list[TrainSequence]:
    return [
        TrainSequence(search.prompts[b], trace, float(adv_BN[b, n]), role=0)
        for b in range(len(search.prompts))
        if keep_B[b]
        for n, trace in enumerate(search.traces[b])
    ]


def aggregation_sequences(agg: AggregationRollout, adv_BKA: torch.Tensor, keep_B: torch.Tensor) -> list[TrainSequence]:
    return [
        TrainSequence(agg.prompts[b][k], trace, float(adv_BKA[b, k, a]), role=1)
        for b in range(len(agg.prompts))
        if keep_B[b]
        for k in range(len(agg.prompts[b]))
        for a, trace in enumerate(agg.traces[b][k])
    ]


def trace_stats(role: str, traces: list[Completion], seconds: float | None = None) -> dict[str, float]:
    """Length, truncation and token counts of one role's traces."""
    if not traces:
        return {}
    tokens = sum(t.num_tokens for t in traces)
    return {
        f"length/{role}": tokens / len(traces),
        f"truncated/{role}": sum(t.finish_reason == "length" for t in traces) / len(traces),
        f"tokens/{role}": float(tokens),
    }


def advantage_stats(role: str, adv: torch.Tensor) -> dict[str, float]:
    flat = adv.flatten().float()
    if flat.numel() == 0:
        return {}
    return {
        f"advantage/{role}_mean": float(flat.mean()),
        f"advantage/{role}_std": float(flat.std(unbiased=False)),
        f"advantage/{role}_min": float(flat.min()),
        f"advantage/{role}_max": float(flat.max()),
    }


def set_stats(rewards_BKA: torch.Tensor) -> dict[str, float]:
    scores_BK = rewards_BKA.float().mean(-1)
    return {
        "sets/score_mean": float(scores_BK.mean()),
        "sets/score_std": float(scores_BK.std(dim=-1, unbiased=False).mean()),
    }


def set_diagnostic_stats(
    search_keys: list[Hashable | None], search_BN: torch.Tensor, sets_BKS: torch.Tensor, rewards_BKA: torch.Tensor
) -> dict[str, float]:
    """Step means of the aggregation diagnostics (:func:`spiral_lit.evaluation.metrics.set_diagnostics`) over all sets.

    ``search_keys``: the answer keys (``Task.answer_key``) of the B * N search traces' extracted answers,
    problem-major; rewards >= 1 count as correct. Recovery/override are left out of a step where no set had a
    wrong/right majority.
    """
    B, N = search_BN.shape
    keys_BN = [search_keys[b * N : (b + 1) * N] for b in range(B)]
    correct_BKS = (search_BN >= 1.0).gather(1, sets_BKS.reshape(B, -1)).view_as(sets_BKS)
    diag = set_diagnostics(gather_sets(keys_BN, sets_BKS), correct_BKS, rewards_BKA >= 1.0)
    means = {f"sets/{key.removeprefix('set_')}": values.nanmean() for key, values in diag.items() if key != "accuracy"}
    return {key: float(value) for key, value in means.items() if not value.isnan()}


def sequences_state(sequences: list[TrainSequence]) -> list[dict[str, Any]]:
    """Pending training sequences as plain types and tensors (weights-only safe)."""
    return [
        {
            "prompt_ids": list(s.prompt_ids),
            "token_ids": list(s.completion.token_ids),
            "logprobs": s.completion.logprobs.detach().cpu(),
            "finish_reason": s.completion.finish_reason,
            "text": s.completion.text,
            "advantage": float(s.advantage),
            "role": int(s.role),
        }
        for s in sequences
    ]


def sequences_from_state(state: list[Mapping[str, Any]]) -> list[TrainSequence]:
    """The inverse of :func:`sequences_state`."""
    return [
        TrainSequence(
            prompt_ids=list(s["prompt_ids"]),
            completion=Completion(list(s["token_ids"]), s["logprobs"], s["finish_reason"], s["text"]),
            advantage=float(s["advantage"]),
            role=int(s["role"]),
        )
        for s in state
    ]
