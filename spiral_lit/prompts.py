"""Search and aggregation prompts, rendered through the tokenizer's chat template.

One policy plays both roles; only the prompt differs (docs/algorithm.md §1). The
aggregation prompt shows the problem and a numbered set of candidate solutions and asks
for one audited, corrected solution. Layout ``problem_restated`` repeats the problem
after the candidates **[ours]**: a 1.85M-parameter model was 22% accurate with the
problem only before four candidates (it lost the operands ~250 tokens back) and
recovered once the problem was restated (docs/algorithm.md §1.2).

What an aggregation answer should look like is a choice too (``aggregation_target``): the correct worked solution
alone, or an audit, one verdict per shown candidate, then the solution (docs/algorithm.md §6.3), or an audit that
keeps a candidate by reference, ``Keep Candidate k:``, whose answer is then candidate k's (docs/algorithm.md §6.4).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal, cast

from transformers import PreTrainedTokenizerBase

from spiral_lit.errors import UserError
from spiral_lit.tasks.base import Problem

AggregationLayout = Literal["problem_first", "problem_restated"]
AggregationTarget = Literal["solution", "audit", "select"]


@dataclass
class PromptConfig:
    """Wording and layout of both prompts; the task adds its own final-answer instruction."""

    search_instruction: str = "Solve step by step."
    """Asks for a step-by-step solution (sequential compute)."""
    aggregation_instruction: str = "Check the candidate solutions and write one correct solution."
    """Asks the aggregator to audit the set and write a corrected final solution."""
    layout: AggregationLayout = "problem_restated"
    """``problem_first``: problem, then candidates. ``problem_restated``: the problem again after them."""
    max_candidate_tokens: int = 256
    """Candidates longer than this are cut in the middle (head and tail kept) [ours]."""
    shuffle_candidates: bool = True
    """Show a set's candidates in a random order, so position carries no signal [ours]."""
    system_prompt: str | None = None
    """Optional system message for chat models."""
    aggregation_target: AggregationTarget = "solution"
    """What warm-start aggregation examples teach: ``solution``, the correct worked solution; ``audit``, first one
    verdict per shown candidate (``Candidate 2: 28 wrong``, from :meth:`Task.candidate_verdict`), then the first
    right candidate kept and copied, or a new solution when none is right, so the aggregator learns to check the
    candidates before it writes (docs/algorithm.md §6.3); ``select`` **[ours]**, the same verdicts, then
    ``Keep Candidate k:`` alone, which the scaffolds resolve to the candidate as shown (what is scored, and what a
    later RSA round sees), or ``Solve again:`` and a new solution. ``select`` changes how aggregation answers are
    read in training and evaluation too, not only the warm start: it is for models too small to copy a candidate
    reliably (docs/algorithm.md §6.4)."""

    def __post_init__(self) -> None:
        if self.max_candidate_tokens < 8:
            raise UserError(f"prompts.max_candidate_tokens must be >= 8, got {self.max_candidate_tokens}")


def _messages(content: str, config: PromptConfig) -> list[dict[str, str]]:
    system = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    return [*system, {"role": "user", "content": content}]


def search_text(problem: Problem, answer_instruction: str, config: PromptConfig) -> str:
    """The user message of a search prompt."""
    return f"{problem.question}\n{config.search_instruction} {answer_instruction}"


def aggregation_text(problem: Problem, candidates: list[str], answer_instruction: str, config: PromptConfig) -> str:
    """The user message of an aggregation prompt; ``candidates`` are already truncated and ordered."""
    shown = "\n".join(f"Candidate {i + 1}:\n{c.strip()}" for i, c in enumerate(candidates))
    parts = [f"Problem: {problem.question}", f"{len(candidates)} candidate solutions:", shown]
    if config.layout == "problem_restated":
        parts.append(f"Problem: {problem.question}")
    parts.append(f"{config.aggregation_instruction} {answer_instruction}")
    return "\n".join(parts)


def audit_text(verdicts: list[str], kept: int | None, solution: str) -> str:
    """An auditing aggregation answer: one verdict line per shown candidate, in the order shown, then
    ``Keep Candidate k:`` and that candidate's solution (``kept`` = k - 1), or ``Solve again:`` and a new one.

    ``Keep Candidate k:`` ends like the prompt's own ``Candidate k:`` header, so copying the kept candidate is
    a continuation of a match (what small models learn first), not a search for its lines.
    """
    lines = [f"Candidate {i + 1}: {verdict}" for i, verdict in enumerate(verdicts)]
    header = "Solve again:" if kept is None else f"Keep Candidate {kept + 1}:"
    return "\n".join([*lines, header, solution])


_AUDIT_HEADER = re.compile(r"^(?:Keep Candidate (\d+):|Solve again:)[ \t]*$", re.MULTILINE)


def kept_candidate(text: str) -> int | None:
    """The 0-based index k - 1 of the candidate an audit keeps (its last header is ``Keep Candidate k:``), or None
    (no header, or ``Solve again:`` last)."""
    headers = list(_AUDIT_HEADER.finditer(text))
    if not headers or headers[-1].group(1) is None:
        return None
    return int(headers[-1].group(1)) - 1


_VERDICT_LINE = re.compile(r"^Candidate (\d+): (.*?)[ \t]*$", re.MULTILINE)


def audit_verdicts(text: str) -> dict[int, str]:
    """The verdict lines of an auditing aggregation answer: ``{k: verdict}`` for each ``Candidate k: verdict``
    line before its last ``Keep Candidate k:`` or ``Solve again:`` header (a candidate judged twice: its first
    line). Evaluation compares them with the task's own verdicts on the candidates shown."""
    headers = list(_AUDIT_HEADER.finditer(text))
    audit = text if not headers else text[: headers[-1].start()]
    verdicts: dict[int, str] = {}
    for line in _VERDICT_LINE.finditer(audit):
        verdicts.setdefault(int(line.group(1)), line.group(2))
    return verdicts


def solution_part(text: str) -> str:
    """The solution an auditing aggregation answer ends with (what follows its last ``Keep Candidate k:`` or
    ``Solve again:`` line); ``text`` itself, the same object, when it has no such line.

    An audit shown as a candidate (recursive aggregation's later rounds) would nest audits of audits in the
    prompt, which no training example has; the next round sees the solutions only (docs/algorithm.md §6.3).
    """
    headers = list(_AUDIT_HEADER.finditer(text))
    return text if not headers else text[headers[-1].end() :].strip()


def truncate_middle(token_ids: list[int], budget: int, marker_ids: list[int]) -> list[int]:
    """Keep the head and the tail (where the final answer is) of an overlong candidate."""
    if len(token_ids) <= budget:
        return token_ids
    keep = budget - len(marker_ids)
    head = keep // 2
    return token_ids[:head] + marker_ids + token_ids[len(token_ids) - (keep - head) :]


class PromptRenderer:
    """Turns problems (and candidate sets) into prompt token ids with the policy's chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: PromptConfig, answer_instruction: str) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.answer_instruction = answer_instruction
        self._marker_ids = tokenizer.encode("\n...\n", add_special_tokens=False)

    def _render(self, content: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            _messages(content, self.config), tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def search(self, problem: Problem) -> list[int]:
        return self._render(search_text(problem, self.answer_instruction, self.config))

    def truncate_candidate(self, candidate_ids: list[int]) -> str:
        """A candidate's text after the token budget cut; of an audit, only its solution (:func:`solution_part`)."""
        full = cast(str, self.tokenizer.decode(candidate_ids, skip_special_tokens=True))  # one sequence: one str
        solution = solution_part(full)
        if solution is not full:
            candidate_ids = self.tokenizer.encode(solution, add_special_tokens=False)
        kept = truncate_middle(candidate_ids, self.config.max_candidate_tokens, self._marker_ids)
        return cast(str, self.tokenizer.decode(kept, skip_special_tokens=True))  # one sequence in, one str out

    def candidate_order(self, n: int, rng: random.Random) -> list[int]:
        """The order in which a set's ``n`` candidates are shown; ``rng`` draws it when shuffling is on."""
        order = list(range(n))
        if self.config.shuffle_candidates:
            rng.shuffle(order)
        return order

    def aggregation(self, problem: Problem, candidates_ids: list[list[int]], rng: random.Random) -> list[int]:
        """Prompt ids for one set; ``rng`` draws the candidate order when shuffling is on."""
        order = self.candidate_order(len(candidates_ids), rng)
        return self.aggregation_shown(problem, [self.truncate_candidate(candidates_ids[i]) for i in order])

    def selection(self, text: str, shown: list[str]) -> str | None:
        """Under ``aggregation_target: select``, the shown candidate that the aggregation ``text`` keeps; None
        otherwise, and when it keeps none or names a candidate that was not shown (then its own text is scored)."""
        if self.config.aggregation_target != "select":
            return None
        k = kept_candidate(text)
        return shown[k] if k is not None and 0 <= k < len(shown) else None

    def aggregation_shown(self, problem: Problem, shown: list[str]) -> list[int]:
        """Prompt ids for candidates already cut and ordered as they are shown."""
        return self._render(aggregation_text(problem, shown, self.answer_instruction, self.config))

    def aggregation_from_texts(self, problem: Problem, candidates: list[str], rng: random.Random) -> list[int]:
        """Same as :meth:`aggregation` for candidates given as text (warm-start data, predict input)."""
        ids = [self.tokenizer.encode(c, add_special_tokens=False) for c in candidates]
        return self.aggregation(problem, ids, rng)
