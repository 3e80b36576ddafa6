"""experiments/tiny_repro/run.py: the summaries its tables are built from, on hand-made values."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "tiny_repro" / "run.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("tiny_repro_run", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summarise_skips_undefined_values(study) -> None:
    out = study.summarise([0.1, None, 0.3, math.nan])
    assert out["mean"] == pytest.approx(0.2)
    assert out["std"] == pytest.approx(math.sqrt(0.02))  # sample sd of (0.1, 0.3)
    assert out["values"][:3] == [0.1, None, 0.3]  # the raw per-seed values are kept for the per-seed table
    assert study.summarise([None, math.nan])["mean"] is None


def test_training_summary_adds_both_roles_tokens_and_averages_the_tail(study) -> None:
    scalars = {
        "tokens/search": [(0, 100.0, 10.0), (1, 120.0, 12.0)],
        "tokens/aggregation": [(0, 200.0, 10.0), (1, 180.0, 13.5)],
        "reward": [(0, 0.25, 10.0), (1, 0.75, 12.0)],
        "train/entropy/search": [(0, 0.3, 10.0), (1, 0.1, 12.0)],
    }
    out = study.training_summary(scalars)
    assert out == {
        "generated_tokens": 600.0,
        "train_seconds": 3.5,
        "final_reward": 0.5,
        "first_entropy": 0.3,
        "final_entropy": pytest.approx(0.2),
    }


def test_train_command_scales_steps_for_the_token_matched_arm(study, tmp_path: Path) -> None:
    command = study.train_command("grpo_2x", 1, 200, tmp_path)
    assert command[command.index("--trainer.max_steps") + 1] == "400"
    assert command[command.index("--config") + 1].endswith("grpo.yaml")
    assert command[command.index("--trainer.logger.init_args.name") + 1] == "grpo_2x_seed1"
