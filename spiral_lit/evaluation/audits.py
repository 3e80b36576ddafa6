"""How an auditing aggregator judges the candidates it was shown (docs/algorithm.md §7.4): its ``Candidate k:``
verdict lines against the task's own verdict on each candidate as shown, so that an aggregation that failed can be
told apart as a misjudged candidate or a bad choice among its own verdicts."""

from __future__ import annotations

import torch

from spiral_lit.evaluation.metrics import verdict_agreement
from spiral_lit.prompts import audit_verdicts
from spiral_lit.runtime.policy import Sampler
from spiral_lit.scaffolds import AggregationRollout
from spiral_lit.tasks.base import Problem, has_verdicts


def audit_metrics(sampler: Sampler, problems: list[Problem], agg: AggregationRollout) -> dict[str, torch.Tensor]:
    """How auditing aggregations (``prompts.aggregation_target`` ``audit`` or ``select``) judge the candidates
    they were shown, per problem (mean over its aggregations), against the task's own verdicts: ``verdict_exact``,
    ``wrong_called_right`` and ``right_called_wrong`` (:func:`~spiral_lit.evaluation.metrics.verdict_agreement`).
    Nothing for free-form aggregation or a task without verdicts."""
    task = sampler.verifier.task
    if sampler.renderer.config.aggregation_target == "solution" or not has_verdicts(task):
        return {}
    per_problem = []
    for b, problem in enumerate(problems):
        rows = []
        for shown, traces in zip(agg.shown[b], agg.traces[b], strict=True):
            truth = [task.candidate_verdict(c, problem) for c in shown]  # once per set, for all its aggregations
            rows += [verdict_agreement(audit_verdicts(trace.text), truth) for trace in traces]
        per_problem.append(torch.tensor(rows, dtype=torch.float64).nanmean(0))
    values = torch.stack(per_problem)
    names = ("verdict_exact", "wrong_called_right", "right_called_wrong")
    return {f"aggregation/{name}": values[:, i] for i, name in enumerate(names)}
