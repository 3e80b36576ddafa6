"""Answer new problems with a test-time scaffold: what ``python -m spiral_lit predict`` returns per problem.

``eval.predict_scaffold`` is dispatched here and only here:

- ``single``: one search trace; its final answer;
- ``majority``: ``eval.n_samples`` search traces; their majority vote (ties: first appearance);
- ``rsa``: recursive self-aggregation (``eval.rsa_population``, ``eval.rsa_set_size``,
  ``eval.rsa_rounds``); the majority vote over the last population.

Seeds come from (``eval.seed``, problem id), as in evaluation. A problem read from a predict
file without an ``answer`` has ``metadata["has_reference"] = False`` and gets no ``correct``.
:class:`spiral_lit.reliability.callbacks.PredictionWriter` writes the records as JSON lines.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from spiral_lit.evaluation.held_out import EvalConfig
from spiral_lit.evaluation.metrics import majority_vote
from spiral_lit.rollout.base import Completion, SamplingConfig
from spiral_lit.runtime.policy import Sampler
from spiral_lit.scaffolds import derive_seed, recursive_aggregation, sample_search
from spiral_lit.tasks.base import Problem


def has_reference(problem: Problem) -> bool:
    """Whether the problem came with a reference answer to score against."""
    return bool(problem.metadata.get("has_reference", True))


def predict_problems(
    sampler: Sampler,
    problems: list[Problem],
    config: EvalConfig,
    search_sampling: SamplingConfig,
    aggregation_sampling: SamplingConfig,
) -> list[dict[str, Any]]:
    """One record per problem: ``id``, ``question``, ``answer``, ``correct`` (with a reference), ``traces``,
    and ``aggregations`` (RSA: one list of member texts per round)."""
    seeds = [derive_seed(config.seed, p.uid) for p in problems]
    search_seeds = [derive_seed(s, "search") for s in seeds]
    engine, renderer, verifier = sampler.engine, sampler.renderer, sampler.verifier
    rounds: list[list[list[Completion]]] = []  # [round][B][N]
    if config.predict_scaffold == "single":
        traces = sample_search(engine, renderer, problems, 1, search_sampling, search_seeds).traces
    elif config.predict_scaffold == "majority":
        traces = sample_search(engine, renderer, problems, config.n_samples, search_sampling, search_seeds).traces
    elif config.predict_scaffold == "rsa":
        traces = sample_search(engine, renderer, problems, config.rsa_population, search_sampling, search_seeds).traces
        rsa = recursive_aggregation(
            engine, renderer, problems, traces, config.rsa_rounds, config.rsa_set_size, aggregation_sampling,
            [derive_seed(s, "rsa") for s in seeds],
        )  # fmt: skip
        rounds = [[[per_set[0] for per_set in per_problem] for per_problem in agg.traces] for agg in rsa]
    else:
        raise ValueError(f"eval.predict_scaffold={config.predict_scaffold!r}; allowed: 'single', 'majority', 'rsa'")
    final = rounds[-1] if rounds else traces
    answers = [[verifier.task.extract_answer(t.final_text) for t in ts] for ts in final]
    # Equivalent answers (Task.answer_key) vote together; the winner is the first answer with the winning key.
    keys = [partial(verifier.task.answer_key, problem=p) for p in problems]
    voted = [majority_vote(a, key) for a, key in zip(answers, keys, strict=True)]
    # correct = the verdict on the first trace that gave the voted answer (as maj@n in evaluation).
    scored = [b for b, p in enumerate(problems) if has_reference(p) and voted[b] is not None]
    texts = [final[b][answers[b].index(voted[b])].final_text for b in scored]
    rewards = verifier.score([problems[b] for b in scored], texts).rewards if scored else []
    correct = {b: reward >= 1.0 for b, reward in zip(scored, rewards, strict=True)}
    records = []
    for b, problem in enumerate(problems):
        record: dict[str, Any] = {"id": problem.uid, "question": problem.question, "answer": voted[b]}
        if has_reference(problem):
            record["correct"] = correct.get(b, False)
        record["traces"] = [t.text for t in traces[b]]
        if rounds:
            record["aggregations"] = [[t.text for t in r[b]] for r in rounds]
        records.append(record)
    return records
