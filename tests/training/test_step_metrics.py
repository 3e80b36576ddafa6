"""step_metrics.py: a training step's majority accuracy compares answer keys, not raw strings."""

from __future__ import annotations

import torch

from spiral_lit.rollout.base import Completion
from spiral_lit.scaffolds import SearchRollout
from spiral_lit.tasks import CountdownTask
from spiral_lit.tasks.base import answer_keys
from spiral_lit.tasks.verify import VerifyResult
from spiral_lit.training.step_config import StepCredit, StepScores
from spiral_lit.training.step_metrics import step_metrics


def test_search_majority_accuracy_votes_by_answer_key() -> None:
    task = CountdownTask()
    batch = [task.problem(0, "train")]  # 5 1 5 -> 30
    answers = ["5*6", "(1+5)*5", "5*6", "5*(1+5)", "(5+1)*5"]
    rewards = [task.score(a, batch[0]) for a in answers]
    assert rewards == [0.0, 1.0, 0.0, 1.0, 1.0]
    traces = [[Completion([1], torch.zeros(1), "stop", a) for a in answers]]
    scores = StepScores(VerifyResult(rewards, list(answers)), torch.tensor([rewards]))
    credit = StepCredit(torch.zeros(1, 5), [], torch.ones(1, dtype=torch.bool), [])
    keys = answer_keys(task, batch, answers)
    metrics = step_metrics(5, SearchRollout([[0]], traces), [], scores, credit, {}, {"generate": 1.0}, keys)
    assert metrics["search/majority_accuracy"] == 1.0  # raw strings would elect the wrong "5*6"
