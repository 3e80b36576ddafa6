"""The LightningDataModule: an endless, sharded, resumable stream of training problems
and a fixed held-out split that never overlaps it.

Batches are plain lists of :class:`~spiral_lit.tasks.base.Problem`; prompts are built by
the LightningModule because the aggregation prompts depend on the policy's own rollouts.
The stream's position (batches consumed on this rank) is saved in checkpoints through
``state_dict`` and counted in ``on_before_batch_transfer``, which runs when a batch is
consumed, not when the loader prefetches it, so a resume neither repeats nor skips.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset, IterableDataset

from spiral_lit.tasks.base import Problem, Task


def _as_list(batch: list[Problem]) -> list[Problem]:
    return batch


def train_indices(num_problems: int | None, seed: int) -> Iterator[int]:
    """Global order of training indices: 0, 1, 2, ... for a procedural task; a fresh shuffle per epoch otherwise."""
    if num_problems is None:
        yield from itertools.count()
        return
    for epoch in itertools.count():
        order = list(range(num_problems))
        random.Random(f"{seed}/epoch/{epoch}").shuffle(order)
        yield from order


class ProblemStream(IterableDataset):
    """Rank ``rank`` of ``world_size`` takes every ``world_size``-th index of the global order."""

    def __init__(
        self, task: Task, seed: int, rank: int, world_size: int, excluded: frozenset[str], skip: int = 0
    ) -> None:
        self.task, self.seed, self.rank, self.world_size = task, seed, rank, world_size
        self.excluded = excluded
        self.skip = skip

    def __iter__(self) -> Iterator[Problem]:
        indices = itertools.islice(
            train_indices(self.task.num_problems("train"), self.seed), self.rank, None, self.world_size
        )
        problems = (self.task.problem(i, "train") for i in indices)
        kept = (p for p in problems if p.question not in self.excluded)
        return itertools.islice(kept, self.skip, None)


class HeldoutProblems(Dataset):
    """The fixed evaluation split (map-style, so Lightning shards it with a distributed sampler)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index: int) -> Problem:
        return self.problems[index]


class ProblemDataModule(L.LightningDataModule):
    """Training stream and held-out split of one task."""

    def __init__(
        self, task: Task, batch_size: int = 4, heldout_size: int = 200, eval_batch_size: int = 50, seed: int = 0
    ) -> None:
        """
        Args:
            task: Where problems and their verifier come from (``class_path`` in YAML).
            batch_size: Prompts per training step on each rank.
            heldout_size: Problems in the fixed validation/test split.
            eval_batch_size: Problems per evaluation batch.
            seed: Shuffling seed for finite datasets.
        """
        super().__init__()
        for key, value in {
            "batch_size": batch_size,
            "heldout_size": heldout_size,
            "eval_batch_size": eval_batch_size,
        }.items():
            if value < 1:
                raise ValueError(f"data.{key} must be >= 1, got {value}")
        available = task.num_problems("heldout")
        if available is not None and available < heldout_size:
            raise ValueError(
                f"data.heldout_size={heldout_size} but task {task.name!r} has only {available} held-out problems"
            )
        self.task = task
        self.batch_size, self.heldout_size, self.eval_batch_size, self.seed = (
            batch_size,
            heldout_size,
            eval_batch_size,
            seed,
        )
        self.heldout = [task.problem(i, "heldout") for i in range(heldout_size)]
        self._excluded = frozenset(p.question for p in self.heldout)
        self.consumed_batches = 0

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        stream = ProblemStream(
            self.task, self.seed, rank, world, self._excluded, skip=self.consumed_batches * self.batch_size
        )
        return DataLoader(stream, batch_size=self.batch_size, collate_fn=_as_list)

    def _heldout_loader(self) -> DataLoader:
        return DataLoader(HeldoutProblems(self.heldout), batch_size=self.eval_batch_size, collate_fn=_as_list)

    def val_dataloader(self) -> DataLoader:
        return self._heldout_loader()

    def test_dataloader(self) -> DataLoader:
        return self._heldout_loader()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self.consumed_batches += 1
        return batch

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        # Problems are text; the module tokenises them on its own device.
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_batches": self.consumed_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consumed_batches = int(state_dict["consumed_batches"])
