"""experiments/stages.sh, the run scripts' preamble: a stopped script stops its running stage and starts no other.

Each test runs a two-stage script whose first stage is a small Python process that reports the signal it got,
as a training stage does (it saves ``last.ckpt`` and exits 128 + the signal number).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGE = """
import signal, sys, time
def stop(signum, frame):
    print(f"stage 1 got {signal.Signals(signum).name}", flush=True)
    sys.exit(128 + signum)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
print("stage 1 running", flush=True)
time.sleep(30)
print("stage 1 finished", flush=True)
"""


def _script(tmp_path: Path, *stages: str) -> Path:
    """A run script of ``stages``, one ``run`` command each, with the experiments' preamble."""
    script = tmp_path / "stages.sh"
    stages_sh, out = ROOT / "experiments" / "stages.sh", tmp_path / "out"
    preamble = ["set -euo pipefail", f"source {stages_sh}", f"begin_run probe {out}"]
    script.write_text("\n".join([*preamble, *(f"run {stage}" for stage in stages)]) + "\n")
    return script


def _start(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    script = _script(tmp_path, f"python -c '{STAGE}'", f"touch {tmp_path / 'stage2'}")
    log = tmp_path / "log"
    # A session of its own with SIGINT at its default, as a script started from a terminal has it.
    process = subprocess.Popen(
        ["bash", str(script)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 20
    while "stage 1 running" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return process, log


@pytest.mark.parametrize(
    ("how", "status"),
    [("ctrl_c", 130), ("kill", 143)],
    ids=["ctrl-c-in-a-terminal", "kill-of-the-script"],
)
def test_a_stopped_script_stops_its_stage_once_and_starts_no_other(tmp_path: Path, how: str, status: int) -> None:
    process, log = _start(tmp_path)
    if how == "ctrl_c":  # the terminal signals its foreground process group: the script's
        os.killpg(process.pid, signal.SIGINT)
    else:  # a scheduler or a user signals the script's process alone
        process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == status
    text = log.read_text()
    name = "SIGINT" if how == "ctrl_c" else "SIGTERM"
    assert text.count("stage 1 got") == 1 and f"stage 1 got {name}" in text, text
    assert "stage 1 finished" not in text and f"stopped by {name}; later stages not started" in text
    assert not (tmp_path / "stage2").exists()


def test_an_unstopped_script_runs_every_stage(tmp_path: Path) -> None:
    script = _script(tmp_path, "true", f"touch {tmp_path / 'stage2'}", "false", f"touch {tmp_path / 'stage4'}")
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=20)
    assert result.returncode == 1  # a failed stage stops the script (set -e), as before
    assert (tmp_path / "stage2").exists() and not (tmp_path / "stage4").exists()
