"""Verifier workers run with least privilege: a scorer that runs hostile code cannot touch the machine or the
trainer, and the same scorers do damage without the sandbox (so these tests bite)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile_task import HostileTask

from spiral_lit.tasks import Verifier

ATTACKS = ["system", "subprocess", "write", "pickle_to_parent"]


def _score(answers: list[str], target: Path, sandbox: bool) -> tuple[list[float], int]:
    task = HostileTask()
    problems = [
        task.problem(i, "train").__class__(uid=f"h/{i}", question="?", answer=str(target)) for i in range(len(answers))
    ]
    with Verifier(task, timeout_s=10.0, num_workers=1, sandbox=sandbox) as verifier:
        result = verifier.score(problems, [f"<answer>{a}</answer>" for a in answers])
    return result.rewards, result.n_errors


@pytest.mark.parametrize("attack", ATTACKS)
def test_attacks_leave_nothing_behind_in_the_sandbox(attack: str, tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    rewards, errors = _score([attack, "fine"], target, sandbox=True)
    assert not target.exists()
    assert rewards == [0.0, 1.0]  # the attack is an error scoring 0; the worker goes on scoring
    assert errors == 1


@pytest.mark.parametrize("attack", ["system", "write"])
def test_the_same_attacks_succeed_without_the_sandbox(attack: str, tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    _score([attack], target, sandbox=False)
    assert target.exists()


def test_files_cannot_be_deleted_nor_sockets_opened(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("user data")
    rewards, errors = _score(["delete", "socket"], target, sandbox=True)
    assert target.read_text() == "user data"
    assert (rewards, errors) == ([0.0, 0.0], 2)


def test_worker_is_confined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIRAL_LIT_TEST_SECRET", "hunter2")
    assert _score(["confined"], tmp_path / "x", sandbox=True)[0] == [1.0]
    assert _score(["confined"], tmp_path / "x", sandbox=False)[0] == [0.0]


def test_memory_limit_is_checked() -> None:
    with pytest.raises(ValueError, match="memory_limit_mb"):
        Verifier(HostileTask(), memory_limit_mb=-1)
