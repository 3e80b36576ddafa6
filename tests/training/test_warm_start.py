"""Warm-start example data: the auditing aggregation targets (docs/algorithm.md §6.3)."""

from __future__ import annotations

import random

import pytest

from spiral_lit.errors import UserError
from spiral_lit.prompts import PromptConfig, PromptRenderer
from spiral_lit.runtime.models import PolicyConfig
from spiral_lit.tasks import ChainSumTask, CountdownTask, Problem
from spiral_lit.tasks.base import Task
from spiral_lit.training.warm_start import WarmStartModule, warm_start_examples


@pytest.fixture(scope="module")
def tokenizer(loaded_policy):
    return loaded_policy[1]


def _examples(tokenizer, task: Task, target: str, seed: int = 0, n_problems: int = 6):
    renderer = PromptRenderer(tokenizer, PromptConfig(aggregation_target=target), task.answer_instruction)
    problems = [task.problem(i, "train") for i in range(n_problems)]
    return problems, warm_start_examples(problems, task, renderer, 4, 0.0, 1.0, random.Random(seed))


def _shown_candidates(prompt: str) -> list[str]:
    """The candidate texts of a rendered aggregation prompt, in the order shown."""
    body = prompt.split("4 candidate solutions:\n", 1)[1].split("\nProblem:", 1)[0]
    return [part.split("\n", 1)[1].strip() for part in body.split("Candidate ")[1:]]


@pytest.mark.parametrize("task", [CountdownTask(), ChainSumTask()], ids=["countdown", "chain_sum"])
def test_audit_target_judges_each_candidate_in_the_order_shown(tokenizer, task: Task) -> None:
    problems, (prompts, targets, roles) = _examples(tokenizer, task, "audit")
    assert roles == [1] * len(problems)
    n_right_seen = set()
    for problem, prompt_ids, target_ids in zip(problems, prompts, targets, strict=True):
        shown = _shown_candidates(tokenizer.decode(prompt_ids))
        target = tokenizer.decode(target_ids, skip_special_tokens=True)
        (*verdict_lines,) = target.split("\n")[:4]
        assert len(shown) == 4
        for i, (candidate, line) in enumerate(zip(shown, verdict_lines, strict=True)):
            right = task.score(task.extract_answer(candidate) or "", problem) == 1.0
            assert line.startswith(f"Candidate {i + 1}: ")
            assert line.endswith("right") == right, (candidate, line)
        header, solution = target.split("\n", 5)[4:]
        right = [i for i, line in enumerate(verdict_lines) if line.endswith("right")]
        # then the first right candidate kept and copied, or a new solution when none is right
        assert header == (f"Keep Candidate {right[0] + 1}:" if right else "Solve again:")
        assert solution == (shown[right[0]] if right else problem.solution)
        n_right_seen.add(len(right))
    assert len(n_right_seen) > 1  # the sets mix right and wrong candidates


def test_select_target_keeps_the_first_right_candidate_by_reference(tokenizer) -> None:
    """``select`` (docs/algorithm.md §6.4): the same verdicts as ``audit``, then ``Keep Candidate k:`` with nothing
    after it, or ``Solve again:`` and the worked solution when no candidate is right."""
    task = CountdownTask()
    problems, (_, audit_targets, _) = _examples(tokenizer, task, "audit", n_problems=12)
    _, (prompts, targets, _) = _examples(tokenizer, task, "select", n_problems=12)
    kinds = set()
    for problem, prompt_ids, target_ids, audit_ids in zip(problems, prompts, targets, audit_targets, strict=True):
        target = tokenizer.decode(target_ids, skip_special_tokens=True)
        audit = tokenizer.decode(audit_ids, skip_special_tokens=True)
        assert target.split("\n")[:4] == audit.split("\n")[:4]  # the same draws, the same verdicts
        header = target.split("\n")[4]
        if header.startswith("Keep Candidate"):
            assert target.split("\n")[5:] == []
            k = int(header.split()[-1].rstrip(":"))
            shown = _shown_candidates(tokenizer.decode(prompt_ids))
            assert task.score(task.extract_answer(shown[k - 1]) or "", problem) == 1.0
        else:
            assert target == audit and target.endswith(problem.solution)
        kinds.add(header.split()[0])
    assert kinds == {"Keep", "Solve"}


def test_solution_target_is_unchanged_by_the_new_option(tokenizer) -> None:
    """The default target is the worked solution alone, with the same prompts and draws as before."""
    task = CountdownTask()
    problems, (prompts, targets, _) = _examples(tokenizer, task, "solution")
    for problem, target_ids in zip(problems, targets, strict=True):
        assert tokenizer.decode(target_ids, skip_special_tokens=True) == problem.solution


def test_audit_right_candidates_differ_from_the_reference_so_only_copying_fits(tokenizer) -> None:
    task = CountdownTask()
    problems, (prompts, targets, _) = _examples(tokenizer, task, "audit", n_problems=12)
    copied_other = 0
    for problem, prompt_ids, target_ids in zip(problems, prompts, targets, strict=True):
        kept = tokenizer.decode(target_ids, skip_special_tokens=True).split("\n", 5)[5]
        assert kept in _shown_candidates(tokenizer.decode(prompt_ids)) or kept == problem.solution
        copied_other += kept != problem.solution
    assert copied_other > 0


def test_countdown_verdicts_read_the_value_reached() -> None:
    task = CountdownTask()
    problem = Problem("c/0", "Use 5 1 5 ...", "30", metadata={"numbers": [5, 1, 5], "target": 30})
    assert task.candidate_verdict("1+5=6\n6*5=30\n<answer>(1+5)*5</answer>", problem) == "30 right"
    assert task.candidate_verdict("5*1=5\n5+5=10\n<answer>5*1+5</answer>", problem) == "10 wrong"
    assert task.candidate_verdict("<answer>6*5</answer>", problem) == "30 wrong numbers"
    assert task.candidate_verdict("no final answer", problem) == "no answer"
    assert task.candidate_verdict("<answer>__import__('os')</answer>", problem) == "no answer"


def test_chain_sum_verdicts_name_the_first_line_that_does_not_add_up() -> None:
    task = ChainSumTask()
    problem = Problem("s/0", "12+30+5", "47", metadata={"terms": [12, 30, 5]})
    assert task.candidate_verdict("12+30=42\n42+5=47\n<answer>47</answer>", problem) == "right"
    assert task.candidate_verdict("12+30=43\n43+5=48\n<answer>48</answer>", problem) == "line 1 wrong"
    assert task.candidate_verdict("12+30=42\n42+5=46\n<answer>46</answer>", problem) == "line 2 wrong"
    assert task.candidate_verdict("12+30=42\n41+5=46\n<answer>46</answer>", problem) == "line 2 wrong"
    assert task.candidate_verdict("12+30=42\n<answer>42</answer>", problem) == "line 2 missing"
    assert task.candidate_verdict("12+30=42", problem) == "no answer"


class _NoVerdicts(ChainSumTask):
    """A task with worked solutions whose candidates cannot be checked from their text."""

    name = "no_verdicts"
    candidate_verdict = Task.candidate_verdict


def test_audit_is_refused_before_loading_for_a_task_without_verdicts(tiny_policy) -> None:
    with pytest.raises(UserError, match="aggregation_target is 'audit', but task 'no_verdicts'"):
        WarmStartModule(
            PolicyConfig(str(tiny_policy.path)), task=_NoVerdicts(), prompts=PromptConfig(aggregation_target="audit")
        )
    with pytest.raises(UserError, match="aggregation_target is 'select', but task 'no_verdicts'"):
        WarmStartModule(
            PolicyConfig(str(tiny_policy.path)), task=_NoVerdicts(), prompts=PromptConfig(aggregation_target="select")
        )
    with pytest.raises(NotImplementedError, match="no candidate verdicts"):
        _NoVerdicts().candidate_verdict("x", ChainSumTask().problem(0, "train"))
