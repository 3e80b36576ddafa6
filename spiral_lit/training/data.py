"""The LightningDataModule: an endless, sharded, resumable stream of training problems,
a fixed held-out split that never overlaps it, and (for ``predict``) problems read from a JSONL file.

Batches are plain lists of :class:`~spiral_lit.tasks.base.Problem`; prompts are built by
the LightningModule because the aggregation prompts depend on the policy's own rollouts.
The stream's position (batches consumed on this rank) is saved in checkpoints through
``state_dict`` and counted in ``on_before_batch_transfer``, which runs when a batch is
consumed, not when the loader prefetches it, so a resume neither repeats nor skips.

Under DDP the held-out split is sharded without padding (rank r evaluates problems r,
r + world, ...): Lightning's default ``DistributedSampler`` would repeat problems to even out
the ranks, counting them twice whenever the world size does not divide ``heldout_size``.
Ranks may then run one batch fewer than others, which evaluation allows (it has no per-batch
collective; metrics are summed once per epoch), so the means are exact (docs/algorithm.md §7.1).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from spiral_lit.errors import PathNotFoundError, UserError
from spiral_lit.scaffolds import derive_rng
from spiral_lit.tasks.base import Problem, Task
from spiral_lit.tasks.rows import BadCell, BadRows, OnBadRow, cell_text, check_on_bad_row, jsonl_records


def _as_list(batch: list[Problem]) -> list[Problem]:
    return batch


def train_indices(num_problems: int | None, seed: int) -> Iterator[int]:
    """Global order of training indices: 0, 1, 2, ... for a procedural task; a fresh shuffle per epoch otherwise."""
    if num_problems is None:
        yield from itertools.count()
        return
    for epoch in itertools.count():
        order = list(range(num_problems))
        derive_rng(seed, "epoch", epoch).shuffle(order)
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
    """A fixed list of problems, the held-out split or a predict file (map-style, so it can be sharded)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index: int) -> Problem:
        return self.problems[index]


def read_predict_problems(path: str, on_bad_row: OnBadRow = "error") -> list[Problem]:
    """Problems from a UTF-8 JSONL file, one object per line: ``question`` (required), ``answer`` and ``id`` (optional).

    A row without ``answer`` (or with ``null``) gets ``metadata["has_reference"] = False`` (no ``correct`` in the
    output); a row without ``id`` gets ``predict/<row index>``. Cells are checked by type
    (:mod:`spiral_lit.tasks.rows`): a bad row is refused naming the file, the line and the key, or with
    ``on_bad_row="skip"`` dropped and counted.
    """
    file = Path(path)
    if not file.is_file():
        raise PathNotFoundError(f"data.predict_path={path!r}: no such file; give a JSONL file of problems")
    source = f"data.predict_path={path!r}"
    bad = BadRows(source, on_bad_row, "data.predict_on_bad_row")
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    for line_no, row in jsonl_records(path, source, bad):
        try:
            problem = _predict_problem(row, default_uid=f"predict/{len(problems)}")
        except BadCell as reason:
            bad.reject(f"line {line_no}", str(reason))
            continue
        if problem.uid in first_line:
            raise UserError(f'{source}, line {line_no}: "id" {problem.uid!r} repeats line {first_line[problem.uid]}')
        first_line[problem.uid] = line_no
        problems.append(problem)
    bad.finish(len(problems))
    if not problems:
        raise UserError(f"{source} holds no problems (the file is empty or only blank lines)")
    return problems


def _predict_problem(row: dict[str, Any], default_uid: str) -> Problem:
    """One predict row as a problem; raises :class:`BadCell` saying which key holds what, and what it must."""
    required = 'a row must be a JSON object with a string "question" (not empty)'
    try:
        if not cell_text(row.get("question"), numbers_ok=False):
            raise BadCell("is empty or missing")
    except BadCell as reason:
        raise BadCell(f'{required}: "question" {reason}') from None
    question = row["question"]  # as written: the output echoes it
    expected = {
        "answer": 'a string or a number (not empty, not NaN; leave "answer" out or write null when there is none)',
        "id": "a string or a number",
    }
    texts: dict[str, str | None] = {}
    for key, must in expected.items():
        try:
            texts[key] = None if row.get(key) is None else cell_text(row[key], numbers_ok=True)
        except BadCell as reason:
            raise BadCell(f'"{key}" must be {must}, but it {reason}') from None
        if texts[key] == "":
            raise BadCell(f'"{key}" must be {must}, but it is empty')
    answer, uid = texts["answer"], texts["id"] or default_uid
    metadata = {"has_reference": answer is not None}
    return Problem(uid, question, "" if answer is None else answer, metadata=metadata)


class ProblemDataModule(L.LightningDataModule):
    """Training stream and held-out split of one task."""

    def __init__(
        self,
        task: Task,
        batch_size: int = 4,
        heldout_size: int = 200,
        eval_batch_size: int = 50,
        seed: int = 0,
        predict_path: str | None = None,
        predict_on_bad_row: OnBadRow = "error",
    ) -> None:
        """
        Args:
            task: Where problems and their verifier come from (``class_path`` in YAML).
            batch_size: Prompts per training step on each rank.
            heldout_size: Problems in the fixed validation/test split.
            eval_batch_size: Problems per evaluation (and predict) batch.
            seed: Shuffling seed for finite datasets.
            predict_path: JSONL file of problems for ``predict``: one object per line with ``question``
                and optionally ``answer`` (then scored) and ``id``.
            predict_on_bad_row: A line of ``predict_path`` that is not a JSON object, or whose ``question``, ``answer``
                or ``id`` is empty or of the wrong type: ``error`` refuses the file naming the line; ``skip`` drops it,
                and the count is logged.
        """
        super().__init__()
        for key, value in {
            "batch_size": batch_size,
            "heldout_size": heldout_size,
            "eval_batch_size": eval_batch_size,
        }.items():
            if value < 1:
                raise UserError(f"data.{key} must be >= 1, got {value}")
        available = task.num_problems("heldout")
        if available is not None and available < heldout_size:
            raise UserError(
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
        check_on_bad_row(predict_on_bad_row, "data.predict_on_bad_row")
        self.predict_path = predict_path
        self.predict_problems = (
            read_predict_problems(predict_path, predict_on_bad_row) if predict_path is not None else None
        )
        self.consumed_batches = 0

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        world = self.trainer.world_size if self.trainer is not None else 1
        stream = ProblemStream(
            self.task, self.seed, rank, world, self._excluded, skip=self.consumed_batches * self.batch_size
        )
        return DataLoader(stream, batch_size=self.batch_size, collate_fn=_as_list)

    def _heldout_loader(self) -> DataLoader:
        dataset = HeldoutProblems(self.heldout)
        world = self.trainer.world_size if self.trainer is not None else 1
        if world == 1:
            return DataLoader(dataset, batch_size=self.eval_batch_size, collate_fn=_as_list)
        if len(dataset) < world:
            raise UserError(f"data.heldout_size={len(dataset)} is smaller than the {world} processes evaluating it")
        # Unpadded sharding (module docstring): every held-out problem is evaluated exactly once.
        assert self.trainer is not None  # world > 1 is a trainer's
        sampler = UnrepeatedDistributedSampler(
            dataset, num_replicas=world, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, collate_fn=_as_list)

    def val_dataloader(self) -> DataLoader:
        return self._heldout_loader()

    def test_dataloader(self) -> DataLoader:
        return self._heldout_loader()

    def predict_dataloader(self) -> DataLoader:
        if self.predict_problems is None:
            raise UserError("data.predict_path is not set: predict reads its problems from a JSONL file")
        # Lightning shards it over ranks without padding (UnrepeatedDistributedSamplerWrapper).
        dataset = HeldoutProblems(self.predict_problems)
        return DataLoader(dataset, batch_size=self.eval_batch_size, collate_fn=_as_list)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            self.consumed_batches += 1
        return batch

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        # Problems are text; the module tokenises them on its own device.
        return batch

    def state_dict(self) -> dict[str, Any]:
        world = self.trainer.world_size if self.trainer is not None else 1
        return {"consumed_batches": self.consumed_batches, "batch_size": self.batch_size, "world_size": world}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        consumed = int(state_dict["consumed_batches"])
        saved = (int(state_dict.get("batch_size", self.batch_size)), int(state_dict.get("world_size", 1)))
        now = (self.batch_size, self.trainer.world_size if self.trainer is not None else 1)
        if saved != now and consumed:
            # Keep the global position: the same number of problems consumed over all ranks, rounded up so that
            # none is shown twice (rank interleaving differs, so a few may be skipped).
            consumed = math.ceil(consumed * saved[0] * saved[1] / (now[0] * now[1]))
            rank_zero_warn(
                f"resuming with data.batch_size={now[0]} on {now[1]} rank(s) where the checkpoint used "
                f"data.batch_size={saved[0]} on {saved[1]}: the training stream continues from about the same "
                "position, not exactly where it stopped"
            )
        self.consumed_batches = consumed
