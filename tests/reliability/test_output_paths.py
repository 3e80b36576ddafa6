"""output_paths.py: what an output location may hold before it is replaced, and writes that land whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from spiral_lit.errors import UserError
from spiral_lit.reliability.output_paths import (
    MARKER,
    atomic_dir,
    check_output,
    commit_file,
    partial_file,
    written_by_us,
)

ARGS = {"what": "--out", "flag": "--overwrite"}


def _write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_new_empty_and_own_outputs_are_accepted(tmp_path: Path) -> None:
    assert check_output(tmp_path / "new", **ARGS) == (tmp_path / "new").resolve()
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", **ARGS)
    check_output(_write(tmp_path / "empty.jsonl", ""), **ARGS, is_dir=False)
    with atomic_dir(tmp_path / "ours", **ARGS) as tmp:
        _write(tmp / "model.bin", "weights")
        _write(tmp / "sub" / "a.txt")
    assert written_by_us(tmp_path / "ours")
    check_output(tmp_path / "ours", **ARGS)


def test_foreign_content_is_refused_unless_overwrite(tmp_path: Path) -> None:
    user = _write(tmp_path / "mine" / "notes.txt", "keep me").parent
    with pytest.raises(UserError, match=r"--out '.*mine' already holds 1 entry \(notes\.txt\).*pass --overwrite"):
        check_output(user, **ARGS)
    check_output(user, **ARGS, overwrite=True)
    data = _write(tmp_path / "data.jsonl", '{"question": "q"}\n')
    with pytest.raises(UserError, match=r"data\.jsonl' already holds a file of 18 bytes"):
        check_output(data, **ARGS, is_dir=False)
    with pytest.raises(UserError, match="is a directory; give the path of a file"):
        check_output(user, **ARGS, is_dir=False, overwrite=True)


def test_an_own_output_changed_by_the_user_is_theirs(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "export", **ARGS) as tmp:
        _write(tmp / "config.json", "{}")
    _write(tmp_path / "export" / "README.md", "my notes")  # an added file
    with pytest.raises(UserError, match="README.md"):
        check_output(tmp_path / "export", **ARGS)
    out = _write(tmp_path / "answers.jsonl", "old")
    partial = _write(partial_file(out), "new answers")
    commit_file(partial, out)
    assert out.read_text() == "new answers" and not partial.exists()
    check_output(out, **ARGS, is_dir=False)  # ours
    out.write_text("edited by hand")
    with pytest.raises(UserError, match="did not write"):
        check_output(out, **ARGS, is_dir=False)


def test_inputs_and_run_directories_are_never_replaced(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ckpt = _write(run / "checkpoints" / "last.ckpt")
    protected = [("the checkpoint", ckpt), ("the run's log directory", run), ("a hub id", None)]
    for out in (ckpt, run, tmp_path):
        with pytest.raises(UserError, match=r"would destroy it.*--overwrite does not change this"):
            check_output(out, **ARGS, overwrite=True, protected=protected)
    check_output(run / "hf", **ARGS, protected=protected)  # inside the run directory is fine


def test_atomic_dir_replaces_the_old_output_only_on_success(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "out", **ARGS) as tmp:
        _write(tmp / "a.txt", "first")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out", **ARGS) as tmp:
        _write(tmp / "a.txt", "second")
        raise RuntimeError("crash mid-write")
    assert (tmp_path / "out" / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary sibling left behind
    with atomic_dir(tmp_path / "out", **ARGS) as tmp:
        _write(tmp / "b.txt", "third")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_checks_again_before_the_swap(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UserError, match="already holds"), atomic_dir(out, **ARGS) as tmp:
        _write(tmp / "a.txt")
        _write(out / "theirs.txt", "appeared during the run")
    assert (out / "theirs.txt").read_text() == "appeared during the run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
