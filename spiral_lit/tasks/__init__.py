"""Tasks: problem sources, answer extraction and verifiers run with a timeout.

Heavy libraries (reasoning-gym, datasets, math-verify) are imported inside the functions
that need them, so importing this package (as every verifier worker does) stays fast.
"""

from spiral_lit.tasks.base import Problem, Split, Task
from spiral_lit.tasks.chain_sum import ChainSumTask
from spiral_lit.tasks.countdown import CountdownTask
from spiral_lit.tasks.extraction import AnswerFormat, answer_instruction, extract_answer, format_answer
from spiral_lit.tasks.math_task import MathDatasetTask
from spiral_lit.tasks.reasoning_gym_task import ReasoningGymSpec, ReasoningGymTask
from spiral_lit.tasks.star_path import StarPathTask
from spiral_lit.tasks.verify import Verifier, VerifyResult

__all__ = [
    "AnswerFormat",
    "ChainSumTask",
    "CountdownTask",
    "MathDatasetTask",
    "Problem",
    "ReasoningGymSpec",
    "ReasoningGymTask",
    "Split",
    "StarPathTask",
    "Task",
    "Verifier",
    "VerifyResult",
    "answer_instruction",
    "extract_answer",
    "format_answer",
]
