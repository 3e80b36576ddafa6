"""scaffolds.py: the seed functions (every seed of the package is derived there, and the integers are pinned, since
a changed derivation would silently change every run's draws), and how aggregation answers that keep a candidate by
reference are resolved (docs/algorithm.md §6.4)."""

from __future__ import annotations

import random

import pytest
import torch
from scripted_engine import ScriptedEngine

from spiral_lit.prompts import PromptConfig, PromptRenderer
from spiral_lit.rollout.base import Completion, SamplingConfig
from spiral_lit.scaffolds import derive_rng, derive_seed, recursive_aggregation, sample_aggregations, step_seed
from spiral_lit.tasks import CountdownTask


def test_seeds_are_the_pinned_integers() -> None:
    assert derive_seed(1234, "heldout/0") == 5492275955718944106  # eval.seed, problem uid
    assert derive_seed(7, "search") == 6197293981575524182
    assert step_seed(0, 3, 1, 2) == 1380060875  # seed, rollout batch, rank, phase
    assert step_seed(42, 0, 0, 6) == 575801584
    assert 0 <= derive_seed("any", 1) < 2**63 and 0 <= step_seed(9, 9, 9, 9) < 2**31


def test_python_rngs_are_seeded_with_the_joined_parts() -> None:
    assert derive_rng(0, "epoch", 1).random() == random.Random("0/epoch/1").random() == 0.8696657112182762
    assert derive_rng(3, 1, 0).random() != derive_rng(3, 0, 1).random()


def _candidates(tokenizer, texts: list[str]) -> list[Completion]:
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    return [Completion(i, torch.zeros(len(i)), "stop", t) for i, t in zip(ids, texts, strict=True)]


@pytest.mark.parametrize("target", ["select", "audit"])
def test_a_kept_candidate_is_scored_and_shown_to_the_next_round(loaded_policy, target: str) -> None:
    tokenizer = loaded_policy[1]
    task = CountdownTask()
    problem = task.problem(0, "heldout")
    texts = [f"{i}+{i}={2 * i}\n<answer>{i}+{i}</answer>" for i in range(1, 5)]
    renderer = PromptRenderer(tokenizer, PromptConfig(aggregation_target=target, shuffle_candidates=False), "A.")
    engine = ScriptedEngine(tokenizer, "Candidate 1: 2 wrong\nKeep Candidate 3:")
    sampling = SamplingConfig(max_new_tokens=8)
    agg = sample_aggregations(
        engine, renderer, [problem], [_candidates(tokenizer, texts)], torch.tensor([[[0, 1, 2, 3]]]), 2, sampling, 0
    )
    for trace in agg.traces[0][0]:
        assert trace.text == "Candidate 1: 2 wrong\nKeep Candidate 3:"  # what the model wrote, trained as is
        assert trace.final_text == (texts[2] if target == "select" else trace.text)
    rounds = recursive_aggregation(engine, renderer, [problem], [_candidates(tokenizer, texts)], 2, 4, sampling, [7])
    last = engine.prompts_seen[-1]
    # round 2 shows round 1's members: under select each is the candidate it kept, under audit its (empty) solution
    shown_texts = [t for t in texts if t in last]
    assert "Keep Candidate" not in last and (len(shown_texts) > 0) == (target == "select")
    assert all(m[0].selected is not None for m in rounds[1].traces[0]) == (target == "select")


def test_the_rollout_records_the_candidates_in_the_order_each_prompt_shows_them(loaded_policy) -> None:
    tokenizer = loaded_policy[1]
    problem = CountdownTask().problem(0, "heldout")
    texts = [f"{i}+{i}={2 * i}\n<answer>{i}+{i}</answer>" for i in range(1, 5)]
    renderer = PromptRenderer(tokenizer, PromptConfig(aggregation_target="select"), "A.")
    engine = ScriptedEngine(tokenizer, "Solve again:")
    sets = torch.tensor([[[0, 1, 2, 3], [3, 2, 1, 0]]])
    agg = sample_aggregations(
        engine, renderer, [problem], [_candidates(tokenizer, texts)], sets, 1, SamplingConfig(), 5
    )
    for shown, prompt in zip(agg.shown[0], engine.prompts_seen, strict=True):
        assert sorted(shown) == sorted(texts)
        assert sorted(shown, key=prompt.index) == shown  # the order of the prompt's Candidate 1..4 blocks
