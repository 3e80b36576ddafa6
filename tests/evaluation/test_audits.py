"""spiral_lit.evaluation.audits: an auditing aggregator's verdict lines scored against the task's, through the
evaluation that reports them (a scripted engine writes the audit, so the values are computed by hand)."""

from __future__ import annotations

import torch
from scripted_engine import ScriptedEngine

from spiral_lit.evaluation.held_out import EvalConfig, evaluate_problems
from spiral_lit.prompts import PromptConfig, PromptRenderer
from spiral_lit.rollout import SamplingConfig
from spiral_lit.runtime.policy import Sampler
from spiral_lit.tasks import CountdownTask
from spiral_lit.tasks.verify import Verifier

SEARCH = SamplingConfig(max_new_tokens=6, temperature=1.0)
AGGREGATION = SamplingConfig(max_new_tokens=5, temperature=1.0)


def test_an_auditing_aggregator_is_scored_on_its_verdicts(loaded_policy) -> None:
    tokenizer = loaded_policy[1]
    task = CountdownTask()
    # Every search trace answers 1+1, which reaches 2 with numbers the problem does not give, so all 4 candidates
    # are wrong and the task's verdict on each is "2 wrong".
    problems = [p for p in (task.problem(i, "heldout") for i in range(20)) if p.metadata["target"] != 2][:2]
    audit = "Candidate 1: 1+1=2 wrong\nCandidate 2: 2 right\nCandidate 3: 2 wrong\nSolve again:\n1+1=2"
    engine = ScriptedEngine(tokenizer, audit, solution="1+1=2\n<answer>1+1</answer>")
    config = EvalConfig(n_samples=4, pass_k=[1], set_size=4, n_agg=2, rsa_rounds=0)

    def evaluate(target: str) -> dict[str, torch.Tensor]:
        renderer = PromptRenderer(tokenizer, PromptConfig(aggregation_target=target), task.answer_instruction)
        with Verifier(task, num_workers=0) as verifier:
            return evaluate_problems(Sampler(engine, renderer, verifier), problems, config, SEARCH, AGGREGATION)

    values = evaluate("select")
    assert values["search/pass@1"].tolist() == [0.0, 0.0]
    assert values["aggregation/verdict_exact"].tolist() == [0.25, 0.25]  # candidate 3's line only
    assert values["aggregation/wrong_called_right"].tolist() == [0.25, 0.25]  # candidate 2 of the 4 wrong ones
    assert values["aggregation/right_called_wrong"].isnan().all()  # no right candidate to miss
    assert "aggregation/verdict_exact" not in evaluate("solution")  # free-form aggregation writes no verdicts
