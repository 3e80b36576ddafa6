"""Problems from reasoning-gym procedural generators, scored by each generator's own verifier.

reasoning-gym builds item ``i`` of a dataset from ``random.Random(seed + i)`` (lazily, on
indexing), so the train and held-out datasets get seeds ``size`` apart: with seeds one
apart, held-out item ``i`` would be train item ``i + 1``. A problem stores where it came
from (spec position and index) and the item itself (``metadata["entry"]``, JSON-serialisable).

The scorer uses that stored item, never a regenerated one: some generators (e.g.
``polynomial_multiplication``) iterate over sets, so the same seed gives another item in a
process with another ``PYTHONHASHSEED``, such as a verifier worker. For the same reason such tasks'
problems, held-out ones included, differ between runs unless ``PYTHONHASHSEED`` is set (e.g. to 0).
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

from spiral_lit.tasks.answer_forms import normalised_text
from spiral_lit.tasks.answer_guard import conforms
from spiral_lit.tasks.base import Problem, Split, Task, UnsafeAnswer

# Generators whose score_answer lower-cases the answer before anything else, so case never changes a score: their
# answer keys ignore case too (tests/tasks/test_reasoning_gym_task.py checks each against its scorer).
_CASE_INSENSITIVE = frozenset({"color_cube_rotation", "family_relationships", "spell_backward"})


@dataclass
class ReasoningGymSpec:
    """One reasoning-gym task in the mixture."""

    name: str
    """A registered reasoning-gym dataset name, e.g. ``chain_sum`` or ``gcd``."""
    weight: float = 1.0
    """Relative probability of drawing a problem from this task."""
    config: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the task's reasoning-gym config class (e.g. ``min_terms``)."""


class ReasoningGymTask(Task):
    """A weighted mixture of reasoning-gym tasks with fixed-size train and held-out splits."""

    name = "reasoning_gym"

    def __init__(
        self,
        tasks: list[ReasoningGymSpec | str],
        seed: int = 0,
        size: int = 100_000,
        heldout_size: int = 1000,
        answer_format: Literal["answer_tag", "boxed"] = "answer_tag",
    ) -> None:
        """
        Args:
            tasks: The mixture: specs, or plain task names (weight 1, default config).
            seed: Seed of the train datasets and of the per-index choice of task.
            size: Problems in the train split.
            heldout_size: Problems in the held-out split (generated from a disjoint range of seeds).
            answer_format: How responses must write their final answer.
        """
        specs = [ReasoningGymSpec(name=t) if isinstance(t, str) else t for t in tasks]
        _validate(specs, size, heldout_size)
        self.specs = specs
        self.seed = seed
        self.size = size
        self.heldout_size = heldout_size
        self.answer_format = answer_format
        self._datasets = self._build_datasets()

    def num_problems(self, split: Split) -> int | None:
        """The configured size of the split."""
        return self.size if split == "train" else self.heldout_size

    def problem(self, index: int, split: Split) -> Problem:
        """Item ``index`` of the task chosen for (seed, split, index) by weight."""
        n = self.size if split == "train" else self.heldout_size
        if not 0 <= index < n:
            raise IndexError(f"reasoning_gym: index {index} out of range for split {split!r} of {n} problems")
        rng = random.Random(f"{self.seed}/{split}/{index}")
        spec_index = rng.choices(range(len(self.specs)), weights=[s.weight for s in self.specs])[0]
        item = self._datasets[split][spec_index][index]
        answer = item["answer"]
        return Problem(
            uid=f"{self.name}/{split}/{index}",
            question=item["question"],
            answer="" if answer is None else str(answer),
            solution=None,  # reasoning-gym has no worked solutions
            metadata={
                "task": self.specs[spec_index].name,
                "spec_index": spec_index,
                "index": index,
                "split": split,
                "entry": item,
            },
        )

    def score(self, extracted_answer: str, problem: Problem) -> float:
        """The generator's own ``score_answer`` on the regenerated item, clamped into [0, 1].

        Note: reasoning-gym's default ``score_answer`` gives partial credit ``len(gold) / len(answer)``
        when the gold answer is a substring of the response's answer (e.g. 0.2 for ``12345`` on gold ``1``).

        Raises:
            UnsafeAnswer: the generator's scorer evaluates answers as code and this one is outside the
                task's answer grammar (:mod:`spiral_lit.tasks.answer_guard`).
        """
        meta = problem.metadata
        dataset = self._datasets[meta["split"]][meta["spec_index"]]
        entry = meta["entry"]
        task_name = self._generator(problem)
        if not conforms(task_name, extracted_answer, entry):
            raise UnsafeAnswer(f"{task_name}: answer outside the task's answer grammar: {extracted_answer[:80]!r}")
        reward = float(dataset.score_answer(extracted_answer, entry=entry))
        if math.isnan(reward):
            return 0.0
        return min(1.0, max(0.0, reward))

    def answer_key(self, answer: str, problem: Problem) -> Hashable:
        """The answer with whitespace runs collapsed (:func:`~spiral_lit.tasks.answer_forms.normalised_text`), and
        lower-cased for the generators whose scorer lower-cases both sides; never parsed or evaluated."""
        text = normalised_text(answer)
        return text.lower() if self._generator(problem) in _CASE_INSENSITIVE else text

    def _generator(self, problem: Problem) -> str:
        """The reasoning-gym task the problem came from (a composite dataset's item names its source)."""
        meta = problem.metadata
        return meta["entry"].get("metadata", {}).get("source_dataset", self.specs[meta["spec_index"]].name)

    def _build_datasets(self) -> dict[str, list[Any]]:
        """The train and held-out datasets of every spec (cheap: reasoning-gym generates items on indexing)."""
        import reasoning_gym  # imported here so verifier workers of other tasks start fast

        seeds = {"train": (self.seed, self.size), "heldout": (self.seed + self.size, self.heldout_size)}
        datasets: dict[str, list[Any]] = {}
        for split, (seed, size) in seeds.items():
            datasets[split] = []
            for i, spec in enumerate(self.specs):
                try:
                    datasets[split].append(reasoning_gym.create_dataset(spec.name, size=size, seed=seed, **spec.config))
                except (TypeError, ValueError, AssertionError) as e:
                    raise ValueError(
                        f"reasoning_gym: tasks[{i}] ({spec.name}): invalid config {spec.config}: {e}"
                    ) from e
        return datasets

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the arguments only: some reasoning-gym datasets carry megabytes of word lists."""
        state = self.__dict__.copy()
        del state["_datasets"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild the datasets from the arguments (deterministic, so items are the same)."""
        self.__dict__.update(state)
        self._datasets = self._build_datasets()


def _validate(specs: list[ReasoningGymSpec], size: int, heldout_size: int) -> None:
    """Check the arguments before building anything, naming the offending key."""
    from reasoning_gym.factory import DATASETS

    if not specs:
        raise ValueError("reasoning_gym: tasks must name at least one reasoning-gym task")
    for i, spec in enumerate(specs):
        if spec.name not in DATASETS:
            raise ValueError(
                f"reasoning_gym: tasks[{i}].name {spec.name!r} is not a reasoning-gym task; "
                f"valid names: {', '.join(sorted(DATASETS))}"
            )
        if not (math.isfinite(spec.weight) and spec.weight > 0):
            raise ValueError(f"reasoning_gym: tasks[{i}].weight must be a positive number, got {spec.weight}")
    if size < 1:
        raise ValueError(f"reasoning_gym: size must be >= 1, got {size}")
    if heldout_size < 1:
        raise ValueError(f"reasoning_gym: heldout_size must be >= 1, got {heldout_size}")
