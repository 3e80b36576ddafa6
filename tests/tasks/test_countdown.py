"""The built-in countdown task: determinism, worked solutions, scoring any valid expression, wrong candidates."""

from __future__ import annotations

import pickle
import random

import pytest

from spiral_lit.tasks import CountdownTask
from spiral_lit.tasks.countdown import evaluate_expression, expression_steps


def _check_solution(solution: str, numbers: list[int], target: int) -> str:
    """Assert every line applies one operator correctly and chains on; return the answer expression."""
    *lines, last = solution.split("\n")
    assert len(lines) == len(numbers) - 1
    previous = None
    used = []
    for line in lines:
        left, result = line.rsplit("=", 1)
        for op in "+*-":
            a, sep, b = left.rpartition(op)
            if sep and a and a[-1].isdigit():
                break
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert int(result) == value, line
        if previous is None:
            used.append(int(a))
        else:
            assert int(a) == previous
        used.append(int(b))
        previous = value
    assert sorted(used) == sorted(numbers)
    assert previous == target
    assert last.startswith("<answer>") and last.endswith("</answer>")
    return last.removeprefix("<answer>").removesuffix("</answer>")


def test_hand_computed_problem_and_solution() -> None:
    problem = CountdownTask().problem(0, "train")
    assert problem.question == "Use 5 1 5 once each with + - * to make 30."
    assert problem.solution == "1+5=6\n6*5=30\n<answer>(1+5)*5</answer>"
    assert problem.answer == "30"
    assert problem.uid == "countdown/train/0"


def test_problems_are_deterministic_and_splits_differ() -> None:
    a, b = CountdownTask(seed=3), CountdownTask(seed=3)
    assert [a.problem(i, "train") for i in range(20)] == [b.problem(i, "train") for i in range(20)]
    assert [a.problem(i, "train").question for i in range(20)] != [a.problem(i, "heldout").question for i in range(20)]


@pytest.mark.parametrize(("n_numbers", "max_number"), [(2, 5), (3, 9), (4, 12)])
def test_worked_solutions_are_correct_and_score_one(n_numbers: int, max_number: int) -> None:
    task = CountdownTask(n_numbers, max_number)
    for i in range(100):
        problem = task.problem(i, "train")
        numbers, target = problem.metadata["numbers"], problem.metadata["target"]
        assert target > 0 and len(numbers) == n_numbers and all(1 <= n <= max_number for n in numbers)
        expression = _check_solution(problem.solution, numbers, target)
        assert task.extract_answer(problem.solution) == expression
        assert task.score(expression, problem) == 1.0


def test_any_valid_expression_scores_and_invalid_ones_do_not() -> None:
    task = CountdownTask()
    problem = task.problem(0, "train")  # 5 1 5 -> 30
    assert task.score("5*(5+1)", problem) == 1.0
    assert task.score(" (5 + 1) * 5 ", problem) == 1.0
    assert task.score("5*5+5", problem) == 0.0  # uses 5 three times, 1 never
    assert task.score("5*6", problem) == 0.0  # 6 is not given
    assert task.score("(1+5)*5*1", problem) == 0.0  # 1 used twice
    assert task.score("30", problem) == 0.0
    for bad in ["", "(1+5)*5)", "-1+5*5", "(1+5)**5", "6/5", "1+5*5; x", "2e1", "1_0+5+5", "True"]:
        assert task.score(bad, problem) == 0.0, bad


def test_evaluate_expression_hand_computed() -> None:
    assert evaluate_expression("(3+4)*2-1") == (13, [3, 4, 2, 1])
    assert evaluate_expression("3+4*2") == (11, [3, 4, 2])
    assert evaluate_expression("3-(4-2)") == (1, [3, 4, 2])
    assert evaluate_expression("abs(3)") is None
    assert evaluate_expression("1" * 65) is None  # over the length cap


def test_wrong_solutions_are_valid_arithmetic_that_misses_the_target() -> None:
    task = CountdownTask()
    rng = random.Random(0)
    for i in range(50):
        problem = task.problem(i, "heldout")
        for wrong in task.wrong_solutions(problem, 3, rng):
            numbers = problem.metadata["numbers"]
            *lines, _ = wrong.split("\n")
            reached = int(lines[-1].rsplit("=", 1)[1])
            assert reached != problem.metadata["target"]
            assert _check_solution(wrong, numbers, reached)
            assert task.score(task.extract_answer(wrong), problem) == 0.0


def test_faked_wrong_solutions_claim_the_target_with_wrong_arithmetic() -> None:
    task = CountdownTask(faked_wrong=1.0)
    rng = random.Random(0)
    slipped = 0
    for i in range(50):
        problem = task.problem(i, "heldout")
        target = problem.metadata["target"]
        for wrong in task.wrong_solutions(problem, 3, rng):
            *lines, answer = wrong.split("\n")
            assert lines[-1].endswith(f"={target}")  # claims the target
            assert task.score(task.extract_answer(wrong), problem) == 0.0  # but its expression misses it
            slipped += lines[0] != expression_steps(task.extract_answer(wrong))[0]
    assert 0 < slipped < 150  # an earlier line is wrong too about half the time


def test_the_new_options_leave_the_default_draws_alone() -> None:
    problem = CountdownTask().problem(3, "train")
    honest = CountdownTask(verdict_steps=True).wrong_solutions(problem, 5, random.Random(1))
    assert honest == CountdownTask().wrong_solutions(problem, 5, random.Random(1))


def test_expression_steps_in_evaluation_order() -> None:
    assert expression_steps("(3+5)*7") == ["3+5=8", "8*7=56"]
    assert expression_steps("5*(1+5)") == ["1+5=6", "5*6=30"]
    assert expression_steps("1+7-4") == ["1+7=8", "8-4=4"]
    assert expression_steps("7") == []
    assert expression_steps("__import__('os')") is None


def test_step_verdicts_recompute_the_answer() -> None:
    task = CountdownTask(verdict_steps=True)
    problem = CountdownTask().problem(0, "train")
    problem.metadata.update(numbers=[5, 1, 5], target=30)
    assert task.candidate_verdict("5+5=10\n10*1=30\n<answer>(5+5)*1</answer>", problem) == "5+5=10 10*1=10 wrong"
    assert task.candidate_verdict("1+5=6\n6*5=30\n<answer>(1+5)*5</answer>", problem) == "1+5=6 6*5=30 right"
    assert task.candidate_verdict("<answer>6*5</answer>", problem) == "6*5=30 wrong numbers"
    assert task.candidate_verdict("no answer here", problem) == "no answer"


def test_target_verdicts_put_the_target_next_to_the_value_reached() -> None:
    problem = CountdownTask().problem(0, "train")
    problem.metadata.update(numbers=[5, 1, 5], target=30)
    steps = CountdownTask(verdict_steps=True, verdict_target=True)
    assert (
        steps.candidate_verdict("5+5=10\n10*1=30\n<answer>(5+5)*1</answer>", problem) == "5+5=10 10*1=10 make 30 wrong"
    )
    assert steps.candidate_verdict("<answer>(1+5)*5</answer>", problem) == "1+5=6 6*5=30 make 30 right"
    assert steps.candidate_verdict("<answer>6*5</answer>", problem) == "6*5=30 make 30 wrong numbers"
    assert steps.candidate_verdict("no answer here", problem) == "no answer"
    value = CountdownTask(verdict_target=True)
    assert value.candidate_verdict("<answer>(5+5)*1</answer>", problem) == "10 make 30 wrong"


def test_bad_settings_and_index_are_refused() -> None:
    with pytest.raises(ValueError, match="n_numbers"):
        CountdownTask(n_numbers=1)
    with pytest.raises(ValueError, match="max_number"):
        CountdownTask(max_number=100)
    with pytest.raises(IndexError, match="index"):
        CountdownTask().problem(-1, "train")
    with pytest.raises(ValueError, match="faked_wrong"):
        CountdownTask(faked_wrong=1.5)


def test_task_pickles_for_verifier_workers() -> None:
    task = pickle.loads(pickle.dumps(CountdownTask(4, 7, seed=2)))
    assert task.problem(5, "train") == CountdownTask(4, 7, seed=2).problem(5, "train")


def test_answer_key_joins_equivalent_expressions_and_keeps_others_apart() -> None:
    task = CountdownTask()
    problem = task.problem(0, "train")  # 5 1 5 -> 30
    key = task.answer_key("(1+5)*5", problem)
    # Every correct answer shares one key, whatever its shape or spacing.
    assert task.answer_key("5*(1+5)", problem) == task.answer_key(" 5 * ( 5 + 1 ) ", problem) == key
    # Wrong numbers (5*6, 1 twice) or another value never join the correct answers, nor each other.
    others = ["5*6", "(1+5)*5*1", "5*5+5", "5*5+1", "30", "abc", "(1+5)*5)"]
    keys = [task.answer_key(a, problem) for a in others]
    assert key not in keys and len(set(keys)) == len(keys)
    # Same numbers, same wrong value: one key (the scorer cannot tell them apart either).
    assert task.answer_key("5*5+1", problem) == task.answer_key("1+5*5", problem)
    # Unparsed answers: only spacing is ignored.
    assert task.answer_key("abc", problem) == task.answer_key(" a b c", problem) != task.answer_key("abd", problem)


def test_answer_keys_agree_with_the_score() -> None:
    # The contract: answers with the same key get the same score.
    task = CountdownTask()
    problem = task.problem(0, "train")
    answers = ["(1+5)*5", "5*(5+1)", "5*6", "5*5+5", "1+5*5", "5*5+1", "30", "(5-1)*5", "5*(5-1)", "x"]
    scores: dict[object, float] = {}
    for answer in answers:
        assert scores.setdefault(task.answer_key(answer, problem), task.score(answer, problem)) == task.score(
            answer, problem
        ), answer


def test_right_solutions_are_all_right_and_vary() -> None:
    """Aggregation warm-start candidates that are right but written differently (docs/algorithm.md §6.3)."""
    task = CountdownTask()
    problem = task.problem(0, "train")  # 5 1 5 -> 30: (1+5)*5 or (5+1)*5
    solutions = task.right_solutions(problem, 20, random.Random(0))
    assert all(task.score(task.extract_answer(s) or "", problem) == 1.0 for s in solutions)
    assert set(solutions) == {"1+5=6\n6*5=30\n<answer>(1+5)*5</answer>", "5+1=6\n6*5=30\n<answer>(5+1)*5</answer>"}
    for index in range(1, 30):
        p = task.problem(index, "train")
        assert all(
            task.score(task.extract_answer(s) or "", p) == 1.0 for s in task.right_solutions(p, 5, random.Random(index))
        )


def test_operators_restrict_problems_answers_and_verdicts() -> None:
    task = CountdownTask(n_numbers=4, operators="+-", verdict_steps=True)
    for i in range(30):
        problem = task.problem(i, "train")
        assert problem.question.endswith(f"once each with + - to make {problem.metadata['target']}.")
        assert problem.solution is not None and "*" not in problem.solution
        assert task.score(task.extract_answer(problem.solution) or "", problem) == 1.0
        for right in task.right_solutions(problem, 3, random.Random(i)):
            assert "*" not in right and task.score(task.extract_answer(right) or "", problem) == 1.0
    # 2*3+1 reaches 7 with the given numbers, but * is not allowed: it scores 0 and its verdict says wrong.
    problem = CountdownTask(n_numbers=3, operators="+-").problem(0, "train")
    hand = type(problem)(uid="h", question="", answer="7", metadata={"numbers": [1, 2, 3], "target": 7})
    plus_minus = CountdownTask(n_numbers=3, operators="+-")
    assert plus_minus.score("2*3+1", hand) == 0.0 and CountdownTask(n_numbers=3).score("2*3+1", hand) == 1.0
    assert plus_minus.candidate_verdict("<answer>2*3+1</answer>", hand) == "7 wrong"
    assert plus_minus.score("(1+3)+2+1", hand) == 0.0  # 1 used twice
    for bad in ["", "+/", "++", "*+-*"]:
        with pytest.raises(ValueError):
            CountdownTask(operators=bad)


def test_default_operators_keep_the_problems_unchanged() -> None:
    # Problems as every run before the operators option drew them (same tuple, same order of draws).
    task = CountdownTask()
    assert [task.problem(i, "train").question for i in (1, 2)] == [
        "Use 3 4 8 once each with + - * to make 15.",
        "Use 1 7 3 once each with + - * to make 11.",
    ]
    assert task.problem(0, "heldout").solution == "5*5=25\n25*9=225\n<answer>5*5*9</answer>"
