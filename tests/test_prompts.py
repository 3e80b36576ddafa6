"""prompts.py: exact prompt texts, aggregation layouts, candidate order and middle truncation."""

from __future__ import annotations

import random

import pytest

from spiral_lit.prompts import (
    PromptConfig,
    PromptRenderer,
    aggregation_text,
    audit_verdicts,
    search_text,
    truncate_middle,
)
from spiral_lit.tasks import Problem

PROBLEM = Problem(uid="p/0", question="12+34+56", answer="102")
ANSWER = "Give the final answer as <answer>...</answer>."
CANDIDATES = ["12+34=46\n46+56=102\n<answer>102</answer>", "12+34=47\n47+56=103\n<answer>103</answer>"]


def test_search_text_is_question_then_instructions() -> None:
    config = PromptConfig()
    assert search_text(PROBLEM, ANSWER, config) == (
        "12+34+56\nSolve step by step. Give the final answer as <answer>...</answer>."
    )


def test_aggregation_text_problem_first() -> None:
    text = aggregation_text(PROBLEM, CANDIDATES, ANSWER, PromptConfig(layout="problem_first"))
    assert text == (
        "Problem: 12+34+56\n"
        "2 candidate solutions:\n"
        "Candidate 1:\n12+34=46\n46+56=102\n<answer>102</answer>\n"
        "Candidate 2:\n12+34=47\n47+56=103\n<answer>103</answer>\n"
        "Check the candidate solutions and write one correct solution. "
        "Give the final answer as <answer>...</answer>."
    )
    assert text.count("Problem: 12+34+56") == 1


def test_aggregation_text_problem_restated_after_last_candidate() -> None:
    text = aggregation_text(PROBLEM, CANDIDATES, ANSWER, PromptConfig(layout="problem_restated"))
    assert text == (
        "Problem: 12+34+56\n"
        "2 candidate solutions:\n"
        "Candidate 1:\n12+34=46\n46+56=102\n<answer>102</answer>\n"
        "Candidate 2:\n12+34=47\n47+56=103\n<answer>103</answer>\n"
        "Problem: 12+34+56\n"
        "Check the candidate solutions and write one correct solution. "
        "Give the final answer as <answer>...</answer>."
    )
    assert text.count("Problem: 12+34+56") == 2
    assert text.rindex("Problem: 12+34+56") > text.rindex("Candidate 2:")


def test_candidates_are_stripped_and_numbered_from_one() -> None:
    text = aggregation_text(PROBLEM, ["  a \n", "b", "\nc"], ANSWER, PromptConfig(layout="problem_first"))
    assert "3 candidate solutions:\nCandidate 1:\na\nCandidate 2:\nb\nCandidate 3:\nc\n" in text
    assert "Candidate 0" not in text and "Candidate 4" not in text


def test_prompt_config_rejects_tiny_candidate_budget() -> None:
    with pytest.raises(ValueError, match="prompts.max_candidate_tokens"):
        PromptConfig(max_candidate_tokens=7)


@pytest.mark.parametrize(
    ("n", "budget", "marker", "expected"),
    [
        (10, 10, [-1], list(range(10))),  # fits exactly: unchanged
        (10, 12, [-1], list(range(10))),  # under budget: unchanged
        (10, 6, [-1], [0, 1, -1, 7, 8, 9]),  # keep 5: head 2, tail 3
        (10, 5, [-1], [0, 1, -1, 8, 9]),  # keep 4: head 2, tail 2
        (10, 7, [-1, -2], [0, 1, -1, -2, 7, 8, 9]),  # two-token marker counts against the budget
        (20, 8, [-1, -2, -3], [0, 1, -1, -2, -3, 17, 18, 19]),  # keep 5 of 20
    ],
)
def test_truncate_middle_hand_cases(n: int, budget: int, marker: list[int], expected: list[int]) -> None:
    out = truncate_middle(list(range(n)), budget, marker)
    assert out == expected
    assert len(out) == min(n, budget)


@pytest.fixture(scope="module")
def tokenizer(loaded_policy):
    return loaded_policy[1]


def _decoded(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids)


def test_search_prompt_renders_through_the_chat_template(tokenizer) -> None:
    renderer = PromptRenderer(tokenizer, PromptConfig(), ANSWER)
    text = _decoded(tokenizer, renderer.search(PROBLEM))
    assert text == (
        "<|im_start|>user\n12+34+56\nSolve step by step. Give the final answer as <answer>...</answer>.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = PromptRenderer(tokenizer, PromptConfig(system_prompt="Be careful."), ANSWER)
    assert _decoded(tokenizer, with_system.search(PROBLEM)).startswith(
        "<|im_start|>system\nBe careful.<|im_end|>\n<|im_start|>user\n12+34+56\n"
    )


def _order(text: str, candidates: list[str]) -> list[int]:
    """Indices of ``candidates`` in the order they appear in ``text``."""
    return sorted(range(len(candidates)), key=lambda i: text.index(candidates[i]))


def test_shuffle_follows_the_rng(tokenizer) -> None:
    candidates = ["<answer>111</answer>", "<answer>222</answer>", "<answer>333</answer>"]
    renderer = PromptRenderer(tokenizer, PromptConfig(shuffle_candidates=True), ANSWER)
    orders = {}
    for seed in range(5):
        ids = renderer.aggregation_from_texts(PROBLEM, candidates, random.Random(seed))
        assert ids == renderer.aggregation_from_texts(PROBLEM, candidates, random.Random(seed))
        expected = list(range(3))
        random.Random(seed).shuffle(expected)  # seed 0 -> [0, 2, 1], seed 4 -> [2, 1, 0]
        orders[seed] = _order(_decoded(tokenizer, ids), candidates)
        assert orders[seed] == expected
    assert orders[0] == [0, 2, 1]
    assert orders[4] == [2, 1, 0]


def test_no_shuffle_keeps_the_order_and_leaves_the_rng_alone(tokenizer) -> None:
    candidates = ["<answer>111</answer>", "<answer>222</answer>", "<answer>333</answer>"]
    renderer = PromptRenderer(tokenizer, PromptConfig(shuffle_candidates=False), ANSWER)
    rng = random.Random(4)
    text = _decoded(tokenizer, renderer.aggregation_from_texts(PROBLEM, candidates, rng))
    assert _order(text, candidates) == [0, 1, 2]
    assert rng.random() == random.Random(4).random()


def test_aggregation_truncates_an_overlong_candidate_to_the_budget(tokenizer) -> None:
    budget = 16
    renderer = PromptRenderer(tokenizer, PromptConfig(max_candidate_tokens=budget, shuffle_candidates=False), ANSWER)
    long_ids = tokenizer.encode("1234567890" * 4, add_special_tokens=False)
    assert len(long_ids) == 40  # one token per digit
    short = "<answer>7</answer>"
    short_ids = tokenizer.encode(short, add_special_tokens=False)
    marker = tokenizer.encode("\n...\n", add_special_tokens=False)
    keep = budget - len(marker)
    head, tail = keep // 2, keep - keep // 2
    expected = ("1234567890" * 4)[:head] + "\n...\n" + ("1234567890" * 4)[40 - tail :]

    truncated = renderer.truncate_candidate(long_ids)
    assert truncated == expected
    assert tokenizer.encode(truncated, add_special_tokens=False) == long_ids[:head] + marker + long_ids[40 - tail :]
    assert len(tokenizer.encode(truncated, add_special_tokens=False)) == budget

    text = _decoded(tokenizer, renderer.aggregation(PROBLEM, [long_ids, short_ids], random.Random(0)))
    assert f"Candidate 1:\n{expected.strip()}\nCandidate 2:\n{short}\n" in text
    assert "1234567890" * 4 not in text


def test_solution_part_keeps_what_follows_the_last_audit_header() -> None:
    from spiral_lit.prompts import solution_part

    audit = "Candidate 1: 9 wrong\nCandidate 2: 14 right\nKeep Candidate 2:\n7*2=14\n<answer>7*2</answer>"
    assert solution_part(audit) == "7*2=14\n<answer>7*2</answer>"
    assert (
        solution_part("Candidate 1: 9 wrong\nSolve again:\n3+4=7\n<answer>3+4</answer>")
        == "3+4=7\n<answer>3+4</answer>"
    )
    plain = "7*2=14\n<answer>7*2</answer>"
    assert solution_part(plain) is plain  # no header: the same text, so other candidates render as before
    assert solution_part("Keep Candidate 2: because") == "Keep Candidate 2: because"  # a header is a whole line


def test_an_audit_shown_as_a_candidate_shows_only_its_solution(tokenizer) -> None:
    """Recursive aggregation's later rounds show aggregation answers as candidates (docs/algorithm.md §6.3)."""
    renderer = PromptRenderer(tokenizer, PromptConfig(), "Answer.")
    audit = "Candidate 1: 9 wrong\nKeep Candidate 2:\n7*2=14\n<answer>7*2</answer>"
    assert renderer.truncate_candidate(tokenizer.encode(audit, add_special_tokens=False)) == (
        "7*2=14\n<answer>7*2</answer>"
    )
    plain = "12+30=42\n<answer>42</answer>"
    assert renderer.truncate_candidate(tokenizer.encode(plain, add_special_tokens=False)) == plain


def test_audit_verdicts_are_the_lines_before_the_last_header() -> None:
    text = (
        "Candidate 1: 3+9=12 12-1=11 wrong\nCandidate 2: 7 right  \nCandidate 1: again\nKeep Candidate 2:\n"
        "Candidate 3: after the header\n"
    )
    assert audit_verdicts(text) == {1: "3+9=12 12-1=11 wrong", 2: "7 right"}  # first line of a candidate; none after
    assert audit_verdicts("Candidate 4: 9 wrong\nSolve again:\n1+2=3") == {4: "9 wrong"}
    assert audit_verdicts("1+2=3\n<answer>1+2</answer>") == {}  # a free-form answer has none


def test_kept_candidate_reads_the_last_audit_header() -> None:
    from spiral_lit.prompts import kept_candidate

    assert kept_candidate("Candidate 1: 9 wrong\nCandidate 2: 14 right\nKeep Candidate 2:") == 1
    assert kept_candidate("Keep Candidate 3:\n7*2=14\nKeep Candidate 1:  \n<answer>7*2</answer>") == 0
    assert kept_candidate("Keep Candidate 1:\nSolve again:\n3+4=7") is None
    assert kept_candidate("7*2=14\n<answer>7*2</answer>") is None
    assert kept_candidate("Keep Candidate 2: it is right") is None  # a header is a whole line


def test_selection_resolves_only_under_select(tokenizer) -> None:
    """``select`` reads ``Keep Candidate k:`` as candidate k as shown (docs/algorithm.md §6.4); other targets
    and out-of-range references leave the trace's own text to be scored."""
    shown = ["1+2=3\n<answer>1+2</answer>", "2*2=4\n<answer>2*2</answer>"]
    select = PromptRenderer(tokenizer, PromptConfig(aggregation_target="select"), ANSWER)
    audit = PromptRenderer(tokenizer, PromptConfig(aggregation_target="audit"), ANSWER)
    assert select.selection("Candidate 1: 3 wrong\nCandidate 2: 4 right\nKeep Candidate 2:", shown) == shown[1]
    assert select.selection("Keep Candidate 3:", shown) is None
    assert select.selection("Keep Candidate 0:", shown) is None
    assert select.selection("Solve again:\n2+2=4\n<answer>2+2</answer>", shown) is None
    assert audit.selection("Keep Candidate 2:", shown) is None
