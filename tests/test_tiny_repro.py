"""experiments/tiny_repro/run.py: the summaries its tables are built from, on hand-made values."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import yaml

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


def test_a_step_logged_again_after_a_resume_counts_once(study) -> None:
    scalars = {
        "tokens/search": [(0, 100.0, 10.0), (1, 120.0, 12.0), (1, 130.0, 50.0), (2, 90.0, 52.0)],
        "reward": [(0, 0.25, 10.0), (1, 0.5, 12.0), (1, 0.75, 50.0), (2, 1.0, 52.0)],
        "train/entropy/search": [(0, 0.3, 10.0), (1, 0.2, 12.0), (1, 0.1, 50.0), (2, 0.4, 52.0)],
    }
    assert study.read_entropy(scalars) == ([0, 1, 2], [0.3, 0.1, 0.4])
    out = study.training_summary(scalars)
    assert out["generated_tokens"] == 320.0  # 100 + 130 + 90: the repeated step 1 once, at its later value
    assert out["final_reward"] == pytest.approx(2.0 / 3.0)  # mean of 0.25, 0.75, 1.0


def test_entropy_figure_averages_the_steps_every_seed_logged(study, tmp_path: Path) -> None:
    entropy = {"spiral": {0: ([0, 1, 2], [0.3, 0.2, 0.1]), 1: ([0, 1], [0.5, 0.4])}}
    study.plot_entropy(entropy, tmp_path)  # seeds of different lengths used to fail with an IndexError
    assert (tmp_path / "entropy.png").stat().st_size > 0


def test_train_command_runs_the_quickstart_config_with_the_arms_overrides(study, tmp_path: Path) -> None:
    command = study.train_command("grpo_matched", 1, tmp_path / "warm", tmp_path)
    assert command[command.index("--config") + 1].endswith("experiments/quickstart/grpo.yaml")
    assert command[command.index("--trainer.logger.init_args.name") + 1] == "grpo_matched_seed1"
    assert command[command.index("--model.init_args.policy.path") + 1] == str(tmp_path / "warm")
    assert command[len(command) - command[::-1].index("--trainer.max_steps")] == "230"  # the arm's, given last
    command = study.train_command("spiral_per_role", 2, tmp_path / "warm", tmp_path)
    assert command[command.index("--config") + 1].endswith("experiments/quickstart/spiral.yaml")
    assert command[command.index("--model.init_args.update.role_normalisation") + 1] == "per_role"


@pytest.mark.parametrize(
    "arm", ["spiral_per_role", "spiral_search0", "grpo", "grpo_matched", "spiral_t2", "spiral_t2_per_role"]
)
def test_every_arm_resolves_to_the_settings_it_names(study, tmp_path: Path, arm: str, capsys) -> None:
    from spiral_lit.cli import main

    with pytest.raises(SystemExit):
        main([*study.train_command(arm, 1, tmp_path, tmp_path)[3:], "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    model = config["model"]["init_args"]
    expected = {
        "spiral_per_role": ("spiral", 60, "per_role", 1.0, 48, 1),
        "spiral_search0": ("spiral", 60, "shared", 0.0, 48, 1),
        "grpo": ("grpo", 60, "shared", 1.0, 184, 1),
        "grpo_matched": ("grpo", 230, "shared", 1.0, 184, 1),
        "spiral_t2": ("spiral", 32, "shared", 1.0, 48, 2),
        "spiral_t2_per_role": ("spiral", 32, "per_role", 1.0, 48, 2),
    }[arm]
    resolved = (
        model["algorithm"]["algorithm"],
        config["trainer"]["max_steps"],
        model["update"]["role_normalisation"],
        model["update"]["search_weight"],
        model["search_sampling"]["max_new_tokens"],
        model["algorithm"]["train_rounds"],
    )
    assert resolved == expected
    assert (config["seed_everything"], model["seed"]) == (1, 1)


def test_tables_show_the_arms_that_ran(study) -> None:
    """``--arms`` may run some arms: the tables name those, and only the differences between arms that ran."""
    keys = [key for key, _ in study.TABLE_ROWS]
    results = {
        "warmstart": dict.fromkeys(keys, 0.5),
        "spiral": {k: study.summarise([0.6, 0.7]) for k in keys},
        "spiral_t2": {k: study.summarise([0.7, 0.8]) for k in keys},
    }
    table = study.results_table(results, [0, 1])
    assert "| metric | warm start | SPIRAL | SPIRAL, 2 trained rounds | SPIRAL, 2 trained rounds − SPIRAL |" in table
    assert "GRPO" not in table and "| 65.0 ± 7.1 | 75.0 ± 7.1 | +10.0 |" in table
    assert study.per_seed_table(results, [0, 1]).count("SPIRAL, 2 trained rounds |") == 2


def test_evaluation_is_the_quickstarts_compare_with_ten_rsa_rounds(study, tmp_path: Path, capsys) -> None:
    from spiral_lit.cli import main

    command = study.compare_command({"spiral": tmp_path / "hf"}, tmp_path / "out")
    config, overrides = command[command.index("--config") + 1], command[command.index("--") + 1 :]
    assert config.endswith("experiments/quickstart/compare.yaml")
    with pytest.raises(SystemExit):
        main(["validate", "--config", config, *overrides, "--print_config"])
    evaluation = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["eval"]
    quickstart = yaml.safe_load(Path(config).read_text())["model"]["init_args"]["eval"]
    assert evaluation["rsa_rounds"] == 10 and quickstart["rsa_rounds"] == 4
    assert {k: evaluation[k] for k in quickstart if k != "rsa_rounds"} == {
        k: v for k, v in quickstart.items() if k != "rsa_rounds"
    }
