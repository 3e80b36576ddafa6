"""Build the quickstart's tiny policy locally: ``python -m spiral_lit tiny --out DIR``.

The tokenizer is trained on the task's own text (questions, worked solutions and the
rendered search/aggregation instructions), so no hub download is needed; the result is a
``save_pretrained`` directory that :func:`spiral_lit.runtime.models.load_policy` reads like any
hub checkpoint.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from jsonargparse import auto_cli

from spiral_lit.errors import UserError
from spiral_lit.prompts import PromptConfig, aggregation_text, audit_text, search_text
from spiral_lit.runtime.models import TinyModelConfig, build_tiny_policy
from spiral_lit.tasks.base import Task
from spiral_lit.tasks.chain_sum import ChainSumTask


def tokenizer_corpus(task: Task, prompts: PromptConfig, n_problems: int) -> Iterator[str]:
    """Every kind of text the model will read or write, for the tokenizer's merges."""
    rng = random.Random(0)
    for i in range(n_problems):
        problem = task.problem(i, "train")
        yield search_text(problem, task.answer_instruction, prompts)
        if problem.solution is not None:
            yield problem.solution
            candidates = [problem.solution, *task.wrong_solutions(problem, 1, rng)]
            yield aggregation_text(problem, candidates, task.answer_instruction, prompts)
            if prompts.aggregation_target != "solution":  # the verdict words get their own tokens too
                verdicts = [task.candidate_verdict(c, problem) for c in candidates]
                yield audit_text(verdicts, 0, problem.solution)
                yield audit_text(verdicts, None, problem.solution)


def build(
    out: str = "runs/quickstart/tiny",
    task: Task | None = None,
    tiny: TinyModelConfig | None = None,
    prompts: PromptConfig | None = None,
    n_corpus_problems: int = 2000,
) -> None:
    """Build and save a tiny Llama + tokenizer for ``task``.

    Args:
        out: Output directory (``save_pretrained`` format).
        task: Task whose text trains the tokenizer (default: built-in chain sums).
        tiny: Model size.
        prompts: Prompt wording, so instruction words get their own tokens.
        n_corpus_problems: Problems sampled for the tokenizer corpus.
    """
    if n_corpus_problems < 1:
        raise UserError(f"--n_corpus_problems must be >= 1, got {n_corpus_problems}: the tokenizer learns from them.")
    task = task or ChainSumTask()
    model, tokenizer = build_tiny_policy(
        out, tokenizer_corpus(task, prompts or PromptConfig(), n_corpus_problems), tiny or TinyModelConfig()
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[spiral_lit] tiny Llama with {n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)} -> {out}")


def main(argv: list[str] | None = None) -> None:
    """``python -m spiral_lit tiny ...``: the options are the parameters of :func:`build`."""
    from spiral_lit.cli import PROG  # the CLI (Lightning) only when run from the command line

    return auto_cli(build, args=argv, prog=f"{PROG} tiny")


if __name__ == "__main__":
    from spiral_lit.cli import run_alias

    run_alias("tiny", __spec__)
