"""Example rollouts as Markdown for TensorBoard's text tab: what the model actually wrote."""

from __future__ import annotations

from typing import cast

import torch
from transformers import PreTrainedTokenizerBase

from spiral_lit.scaffolds import AggregationRollout, SearchRollout
from spiral_lit.tasks.base import Problem


def _block(text: str) -> str:
    return "    " + text.replace("\n", "\n    ")


def rollout_markdown(
    tokenizer: PreTrainedTokenizerBase,
    problem: Problem,
    search: SearchRollout,
    search_rewards_BN: torch.Tensor,
    rounds: list[AggregationRollout],
    rewards_BKA: list[torch.Tensor],
) -> str:
    """The first problem of a batch: its search traces, then per trained round of aggregation its first set's
    prompt and outputs, with rewards."""
    lines = [f"**problem** `{problem.uid}`, reference answer `{problem.answer}`", "", "**search traces**"]
    for n, trace in enumerate(search.traces[0]):
        lines += [f"{n}: reward {float(search_rewards_BN[0, n]):.2f}", "", _block(trace.text), ""]
    for r, (agg, round_BKA) in enumerate(zip(rounds, rewards_BKA, strict=True)):
        members = agg.sets_BKS[0, 0].tolist()
        prompt = cast(str, tokenizer.decode(agg.prompts[0][0]))  # one sequence in, one str out
        label = "" if len(rounds) == 1 else f"round {r + 1} "
        lines += [f"**{label}aggregation prompt** (set {members})", "", _block(prompt), ""]
        for a, trace in enumerate(agg.traces[0][0]):
            lines += [f"aggregation {a}: reward {float(round_BKA[0, 0, a]):.2f}", "", _block(trace.text), ""]
    return "\n".join(lines)
