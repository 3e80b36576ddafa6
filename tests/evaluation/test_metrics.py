"""pass@k, majority vote, aggregation diagnostics (docs/algorithm.md §7.2, §7.4) and paired bootstrap intervals."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from functools import partial

import pytest
import torch

from spiral_lit.evaluation.metrics import (
    gather_sets,
    majority_vote,
    majority_vote_correct,
    paired_bootstrap_interval,
    pass_at_k,
    says_right,
    set_diagnostics,
    verdict_agreement,
)
from spiral_lit.tasks import CountdownTask
from spiral_lit.tasks.base import answer_keys


def _brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force() -> None:
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_hand_values() -> None:
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the mean accuracy c / n
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # only 2 wrong samples: every 3-subset has a correct one


def test_pass_at_k_stable_for_n_1024() -> None:
    n = 1024
    for c in (0, 1, 7, 100, 512, 1023, 1024):
        values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values), c
        assert all(a <= b + 1e-12 for a, b in zip(values, values[1:], strict=False)), f"not monotone in k, c={c}"
    # Against exact rational arithmetic, where the binomials (~1e140) overflow a float.
    for c, k in [(7, 100), (1, 1000), (100, 5), (3, 512)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    ("n", "c", "k", "match"),
    [(4, 1, 5, "k <= n"), (4, 5, 2, "c <= n"), (-1, 0, 1, "n >= 0"), (4, -1, 1, "c >= 0"), (4, 1, 0, "k >= 1")],
)
def test_pass_at_k_errors(n: int, c: int, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_majority_vote() -> None:
    assert majority_vote(["a", "b", "b"]) == "b"
    assert majority_vote([None, "x", None]) == "x"  # None never wins, even when most frequent
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_majority_vote_tie_goes_to_first_appearance() -> None:
    assert majority_vote(["a", "b", "b", "a"]) == "a"
    assert majority_vote(["b", "a", "a", "b"]) == "b"
    assert majority_vote([None, "c", "b", "b", "c", None]) == "c"


def test_majority_vote_correct() -> None:
    # Voted "2" (2 votes); the first trace that gave it is index 1.
    assert majority_vote_correct(["1", "2", "2"], [False, True, False]) is True
    assert majority_vote_correct(["1", "2", "2"], [True, False, True]) is False
    assert majority_vote_correct(["1", "2"], [False, True]) is False  # tie -> "1", the first
    assert majority_vote_correct([None, None], [False, False]) is False
    with pytest.raises(ValueError, match="same length"):
        majority_vote_correct(["1"], [True, False])


def test_gather_sets_picks_each_sets_members() -> None:
    sets_BKS = torch.tensor([[[0, 2], [1, 2]], [[1, 0], [2, 2]]])
    assert gather_sets([["a", "b", "c"], ["x", "y", "z"]], sets_BKS) == [
        [["a", "c"], ["b", "c"]],
        [["y", "x"], ["z", "z"]],
    ]


def _nan_equal(actual: torch.Tensor, expected: list[list[float]]) -> bool:
    return torch.equal(actual.isnan(), torch.tensor(expected).isnan()) and torch.allclose(
        actual.nan_to_num(-1.0), torch.tensor(expected).nan_to_num(-1.0)
    )


def test_set_diagnostics_on_hand_built_sets() -> None:
    nan = math.nan
    # Set 0: majority "5" is right, one of two aggregations goes wrong (override 0.5).
    # Set 1: majority "7" is wrong, both aggregations find the lone right "5" (recovery 1).
    # Set 2: no candidate is right and two are unparsed; the aggregations stay wrong (recovery 0).
    answers = [[["5", "5", "7"], ["7", "7", "5"], [None, None, "9"]]]
    candidate_correct = torch.tensor([[[True, True, False], [False, False, True], [False, False, False]]])
    aggregation_correct = torch.tensor([[[True, False], [True, True], [False, False]]])
    diag = set_diagnostics(answers, candidate_correct, aggregation_correct)
    assert _nan_equal(diag["set_oracle"], [[1.0, 1.0, 0.0]])
    assert _nan_equal(diag["set_majority"], [[1.0, 0.0, 0.0]])
    assert _nan_equal(diag["accuracy"], [[0.5, 1.0, 0.0]])
    assert _nan_equal(diag["recovery"], [[nan, 1.0, 0.0]])
    assert _nan_equal(diag["override"], [[0.5, nan, nan]])
    assert _nan_equal(diag["distinct_answers"], [[2.0, 2.0, 1.0]])
    # Rates over the sets where they are defined, as a NaN-skipping mean gives them.
    assert float(diag["recovery"].nanmean()) == 0.5
    assert float(diag["override"].nanmean()) == 0.5


def test_set_diagnostics_majority_tie_uses_the_first_answer() -> None:
    # "1" and "2" tie; "1" appeared first and is wrong, so the majority is wrong although "2" is right.
    diag = set_diagnostics([[["1", "2"]]], torch.tensor([[[False, True]]]), torch.tensor([[[True]]]))
    assert diag["set_majority"].item() == 0.0 and diag["set_oracle"].item() == 1.0
    assert diag["recovery"].item() == 1.0 and diag["override"].isnan().item()


def test_set_diagnostics_checks_shapes() -> None:
    with pytest.raises(ValueError, match="answers_BKS"):
        set_diagnostics([[["1"]]], torch.zeros(1, 1, 2, dtype=torch.bool), torch.zeros(1, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="aggregation_correct_BKA"):
        set_diagnostics([[["1"]]], torch.zeros(1, 1, 1, dtype=torch.bool), torch.zeros(1, 2, 1, dtype=torch.bool))


def test_equivalent_countdown_answers_vote_together() -> None:
    task = CountdownTask()
    problem = task.problem(0, "train")  # 5 1 5 -> 30
    answers = ["5*6", "(1+5)*5", "5*6", None, "5*(1+5)", "(5+1)*5"]
    correct = [task.score(a, problem) == 1.0 if a is not None else False for a in answers]
    # As raw strings the wrong "5*6" wins 2 to 1; as answers, the three correct expressions win 3 to 2.
    assert majority_vote(answers) == "5*6"
    key = partial(task.answer_key, problem=problem)
    assert majority_vote(answers, key) == "(1+5)*5"  # the first answer with the winning key
    assert majority_vote_correct(answers, correct, key) is True
    keys = answer_keys(task, [problem] * len(answers), answers)
    assert majority_vote(keys) == keys[1] and majority_vote_correct(keys, correct) is True


def test_majority_vote_by_key_ties_go_to_the_key_seen_first() -> None:
    assert majority_vote(["b", "A", "a", "B"], str.lower) == "b"
    assert majority_vote(["x", "A", "a"], str.lower) == "A"
    assert majority_vote_correct(["b", "A", "a", "B"], [False, True, True, True], str.lower) is False


def test_set_diagnostics_count_equivalent_answers_once() -> None:
    task = CountdownTask()
    problem = task.problem(0, "train")
    answers_S = ["(1+5)*5", "5*(5+1)", "5*6", "5*6"]
    keys_BKS = [[answer_keys(task, [problem] * 4, answers_S)]]
    correct_BKS = torch.tensor([[[True, True, False, False]]])
    diag = set_diagnostics(keys_BKS, correct_BKS, torch.tensor([[[True]]]))
    assert diag["distinct_answers"].item() == 2.0 and diag["set_majority"].item() == 1.0


def test_paired_interval_of_a_constant_difference_is_that_constant() -> None:
    a = torch.tensor([0.0, 0.25, 1.0, 0.5, 0.75])
    assert paired_bootstrap_interval(a, a + 0.5) == pytest.approx((0.5, 0.5, 0.5))
    # The problems' own spread (a varies a lot) does not widen a paired interval.
    assert paired_bootstrap_interval(a, a) == (0.0, 0.0, 0.0)


def test_paired_interval_of_one_problem_is_its_difference() -> None:
    assert paired_bootstrap_interval(torch.tensor([0.25]), torch.tensor([1.0]), n_resamples=7) == (0.75, 0.75, 0.75)


def test_paired_interval_of_two_problems_by_hand() -> None:
    # d = [0, 1]: a resample's mean is 0, 0.5 or 1 with chance 1/4, 1/2, 1/4.
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    assert paired_bootstrap_interval(a, b, level=0.9) == (0.5, 0.0, 1.0)  # 5% and 95% quantiles: 0 and 1
    assert paired_bootstrap_interval(a, b, level=0.2) == (0.5, 0.5, 0.5)  # 40% and 60%: both inside the 0.5s
    assert paired_bootstrap_interval(b, a, level=0.9) == (-0.5, -1.0, 0.0)


def test_paired_interval_is_seeded_and_near_the_normal_interval() -> None:
    d = torch.rand(1000, generator=torch.Generator().manual_seed(1))  # several draws of resamples (chunks)
    a = torch.zeros(1000)
    first = paired_bootstrap_interval(a, d, seed=3)
    assert paired_bootstrap_interval(a, d, seed=3) == first
    assert paired_bootstrap_interval(a, d, seed=4) != first
    mean, low, high = first
    half = 1.96 * float(d.double().std()) / math.sqrt(1000)
    assert mean == pytest.approx(float(d.double().mean()))
    assert low == pytest.approx(mean - half, abs=0.1 * half) and high == pytest.approx(mean + half, abs=0.1 * half)


def test_paired_interval_rejects_unpaired_empty_or_undefined_values() -> None:
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap_interval(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap_interval(torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="at least one problem"):
        paired_bootstrap_interval(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap_interval(torch.tensor([0.0, math.nan]), torch.zeros(2))
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap_interval(torch.zeros(2), torch.zeros(2), level=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap_interval(torch.zeros(2), torch.zeros(2), n_resamples=0)


def test_verdict_agreement_hand_computed() -> None:
    truth = ["1+2=3 make 3 right", "4 make 3 wrong", "no answer", "3 make 3 right"]
    said = {1: "1+2=3 make 3 right", 2: "4 make 3 right", 3: "no answer"}  # candidate 4 has no line
    exact, wrong_called_right, right_called_wrong = verdict_agreement(said, truth)
    assert exact == 2 / 4
    assert wrong_called_right == 1 / 2  # candidate 2 of the wrong ones (2, 3)
    assert right_called_wrong == 1 / 2  # candidate 4 of the right ones (1, 4): no line is not a "right"
    all_right = verdict_agreement({1: "right"}, ["right"])
    assert all_right[:1] == (1.0,) and math.isnan(all_right[1]) and all_right[2] == 0.0


def test_a_verdict_says_right_by_its_last_word() -> None:
    assert says_right("1+2=3 right") and says_right("right")
    assert not says_right("line 3 wrong") and not says_right("right wrong") and not says_right("")
