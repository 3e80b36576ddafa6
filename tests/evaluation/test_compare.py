"""``python -m spiral_lit compare`` on two tiny checkpoints (a Hugging Face directory and a Lightning .ckpt), each
evaluated by ``trainer.validate``, the curve table behind its plots and the paired intervals between checkpoints."""

from __future__ import annotations

import csv
import glob
import json
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import spiral_lit.evaluation.compare as compare_module
from spiral_lit.cli import main as cli_main
from spiral_lit.errors import UserError
from spiral_lit.evaluation.compare import INTERVAL_FIELDS, _as_one_list, interval_rows, main, parse_checkpoints
from spiral_lit.evaluation.plots import curve_rows
from spiral_lit.runtime.models import TinyModelConfig, build_tiny_policy

FAST_EVAL = {
    "n_samples": 2, "pass_k": [1, 2], "set_size": 2, "n_agg": 1, "budgets": [3, 6],
    "rsa_population": 2, "rsa_set_size": 2, "rsa_rounds": 2,
}  # fmt: skip


def _config(tmp_path: Path, policy_dir: Path) -> Path:
    config = {
        # One validation batch and two devices: compare evaluates every held-out problem, in one process.
        "trainer": {"accelerator": "cpu", "devices": 2, "precision": "32-true", "limit_val_batches": 1},
        "model": {
            "class_path": "spiral_lit.SpiralModule",
            "init_args": {
                "policy": {"path": str(policy_dir)},
                "search_sampling": {"max_new_tokens": 6},
                "aggregation_sampling": {"max_new_tokens": 4},
                "verifier": {"num_workers": 0},
                "eval": FAST_EVAL,
            },
        },
        "data": {"task": {"class_path": "hash_task.VoteTask", "init_args": {"n_terms": 2, "digits": 2}},
                 "heldout_size": 4, "eval_batch_size": 3},
    }  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _means_batch_by_batch(config: Path, policy_dir: Path) -> dict[str, float]:
    """What compare computed before it ran ``trainer.validate``: the module's ``evaluate_batch`` over the held-out
    problems in ``eval_batch_size`` batches, each metric's mean over its non-NaN values in float64."""
    args = ["--config", str(config), "--trainer.devices", "1", "--model.init_args.policy.path", str(policy_dir)]
    cli = cli_main(args, run=False)
    module, data = cli.model, cli.datamodule
    module.configure_model()
    module.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    try:
        for start in range(0, len(data.heldout), data.eval_batch_size):
            with torch.inference_mode():
                values = module.evaluate_batch(data.heldout[start : start + data.eval_batch_size])
            for key, value in values.items():
                kept = value.double()[~value.isnan()]
                sums[key] = sums.get(key, 0.0) + float(kept.sum())
                counts[key] = counts.get(key, 0) + kept.numel()
    finally:
        module.runtime.close()
    return {key: sums[key] / counts[key] if counts[key] else math.nan for key in sums}


def test_compare_writes_tables_and_plots(tiny_policy, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["spiral_lit", "compare"])
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    validated = []
    validate = L.Trainer.validate
    monkeypatch.setattr(L.Trainer, "validate", lambda self, *a, **k: validated.append(self) or validate(self, *a, **k))
    # The same weights as a Lightning checkpoint: its numbers must equal the directory's (same problems and seeds).
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"policy.{k}": v for k, v in tiny_policy.model.state_dict().items()}}, ckpt)
    out = tmp_path / "compare"
    config = _config(tmp_path, tiny_policy.path)
    cli_main(["compare", "--checkpoints", f"hf={tiny_policy.path}", f"ckpt={ckpt}", "--config", str(config),
              "--out", str(out)])  # fmt: skip
    for name in ("metrics.csv", "metrics.json", "curves.csv", "curves.json", "intervals.csv", "intervals.json",
                 "per_problem.csv", "accuracy_vs_tokens.png", "pass_at_k.png", "rsa_rounds.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    assert glob.glob(str(out / "tensorboard" / "events.out.tfevents*"))
    assert [(t.num_devices, t.limit_val_batches) for t in validated] == [(1, 1.0)] * 2
    assert list((tmp_path / "cwd").iterdir()) == []  # nothing written beside --out (no config.yaml)

    metrics = json.loads((out / "metrics.json").read_text())
    by_checkpoint: dict[str, dict[str, float | None]] = {}
    for row in metrics:
        by_checkpoint.setdefault(row["checkpoint"], {})[row["metric"]] = row["value"]
    assert by_checkpoint["hf"] == by_checkpoint["ckpt"]
    assert {"search/pass@2", "sequential/accuracy@6", "rsa/majority@2", "aggregation/recovery"} <= set(
        by_checkpoint["hf"]
    )
    # The numbers compare wrote before it went through trainer.validate (NaN: a rate no problem defines).
    expected = {k: None if math.isnan(v) else v for k, v in _means_batch_by_batch(config, tiny_policy.path).items()}
    assert by_checkpoint["hf"] == expected
    curves = list(csv.DictReader((out / "curves.csv").open()))
    assert {(r["checkpoint"], r["scaffold"]) for r in curves} == {
        (c, s) for c in ("hf", "ckpt") for s in ("sequential", "majority", "pass@k", "rsa", "rsa_majority")
    }
    assert [r["x"] for r in curves if r["checkpoint"] == "hf" and r["scaffold"] == "rsa"] == ["0", "1", "2"]

    # The same weights under two names: every per-problem difference is 0, so is every interval.
    with (out / "intervals.csv").open() as f:
        assert csv.DictReader(f).fieldnames == INTERVAL_FIELDS
    intervals = {r["metric"]: r for r in json.loads((out / "intervals.json").read_text())}
    expected_metrics = {"search/pass@1", "sequential/accuracy@6", "aggregation/accuracy", "aggregation/set_oracle",
                        "rsa/accuracy@2", "rsa/majority@2", "rsa/tokens@2"}  # fmt: skip
    assert expected_metrics <= set(intervals) <= set(by_checkpoint["hf"])
    assert "rsa/set_oracle" not in intervals  # RSA's diagnostics are per set: 2 sets per problem
    assert intervals["search/pass@1"]["n_problems"] == 4
    for row in intervals.values():
        assert (row["checkpoint"], row["baseline"]) == ("ckpt", "hf")
        assert row["difference"] == row["low"] == row["high"] == 0.0
        assert 2 <= row["n_problems"] <= 4
    per_problem = list(csv.DictReader((out / "per_problem.csv").open()))
    pass1 = {(r["checkpoint"], r["uid"]): float(r["value"]) for r in per_problem if r["metric"] == "search/pass@1"}
    assert len(pass1) == 8 and sum(pass1.values()) / 8 == by_checkpoint["hf"]["search/pass@1"]


def test_curve_rows_from_metric_names() -> None:
    metrics = {
        "a": {
            "search/pass@1": 0.2, "search/pass@4": 0.6, "search/maj@1": 0.2, "search/maj@4": 0.3,
            "search/tokens@1": 10.0, "search/tokens@4": 40.0, "search/prompt_tokens": 30.0,
            "sequential/accuracy@8": 0.1, "sequential/tokens@8": 8.0, "sequential/prompt_tokens@8": 30.0,
            "rsa/accuracy@0": 0.25, "rsa/majority@0": 0.3, "rsa/tokens@0": 40.0, "rsa/prompt_tokens@0": 30.0,
            "aggregation/accuracy": 0.4,
        }
    }  # fmt: skip
    rows = {(r["scaffold"], r["x"]): r for r in curve_rows(metrics)}
    assert set(rows) == {("pass@k", 1), ("pass@k", 4), ("majority", 1), ("majority", 4), ("sequential", 8),
                         ("rsa", 0), ("rsa_majority", 0)}  # fmt: skip
    assert rows[("majority", 4)] == {"checkpoint": "a", "scaffold": "majority", "x": 4, "accuracy": 0.3,
                                     "tokens": 40.0, "prompt_tokens": 30.0}  # fmt: skip
    assert rows[("sequential", 8)]["prompt_tokens"] == 30.0 and rows[("rsa_majority", 0)]["accuracy"] == 0.3
    assert not math.isnan(rows[("pass@k", 4)]["tokens"])


def test_bad_checkpoint_entries_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected name=path"):
        parse_checkpoints(["just-a-path"])
    with pytest.raises(FileNotFoundError, match="nope"):
        parse_checkpoints([f"a={tmp_path / 'nope'}"])
    with pytest.raises(ValueError, match="used twice"):
        parse_checkpoints([f"a={tmp_path}", f"a={tmp_path}"])


def test_checkpoints_may_follow_the_option_as_separate_words() -> None:
    joined = ["--checkpoints", '["a=x", "b=y"]', "--out", "o"]
    assert _as_one_list(["--checkpoints", "a=x", "b=y", "--out", "o"], "--checkpoints") == joined
    assert _as_one_list(["--checkpoints=a=x", "b=y", "--out", "o"], "--checkpoints") == joined
    assert _as_one_list(["--checkpoints", "[a=x]"], "--checkpoints") == ["--checkpoints", "[a=x]"]


def _other_size_checkpoint(path: Path) -> Path:
    small = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2)
    other, _ = build_tiny_policy(path.parent / "other", ["12+34=46"] * 20, small)
    torch.save({"state_dict": {f"policy.{k}": v for k, v in other.state_dict().items()}}, path)
    return path


def test_every_checkpoint_is_checked_before_any_is_evaluated(tiny_policy, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["spiral_lit.evaluation.compare"])
    evaluated = []
    monkeypatch.setattr(compare_module, "evaluate_checkpoint", lambda name, *args: evaluated.append(name) or ({}, {}))
    bad = _other_size_checkpoint(tmp_path / "small.ckpt")
    config = _config(tmp_path, tiny_policy.path)
    args = ["--config", str(config), "--out", str(tmp_path / "compare")]
    with pytest.raises(UserError, match=r"--checkpoints entry small=.*small\.ckpt.* does not fit .*differ in shape"):
        main([*args, "--checkpoints", f"hf={tiny_policy.path}", f"small={bad}"])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match=r"--checkpoints entry e=.*empty_dir.*no config\.json"):
        main([*args, "--checkpoints", f"hf={tiny_policy.path}", f"e={tmp_path / 'empty_dir'}"])
    assert evaluated == [] and not (tmp_path / "compare").exists()


def test_options_after_a_double_dash_override_the_config_for_every_checkpoint(
    tiny_policy, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(sys, "argv", ["spiral_lit.evaluation.compare"])
    seen = []
    monkeypatch.setattr(
        compare_module, "evaluate_checkpoint", lambda name, *args: seen.append((name, args[-1])) or ({}, {})
    )
    config = _config(tmp_path, tiny_policy.path)
    args = ["--config", str(config), "--out", str(tmp_path / "compare"), "--checkpoints", f"a={tiny_policy.path}"]
    override = ["--model.init_args.eval.rsa_rounds", "7"]
    main([*args, f"b={tiny_policy.path}", "--", *override])
    assert seen == [("a", override), ("b", override)]
    built = compare_module._build(str(config), tiny_policy.path, None, override)
    assert built.model.hparams["eval"]["rsa_rounds"] == 7
    assert built.trainer.num_devices == 1  # compare's own settings still win
    seen.clear()
    with pytest.raises(SystemExit):  # a mistyped key fails before any checkpoint is evaluated
        main([*args, "--", "--model.init_args.eval.rsa_roundz", "7"])
    assert seen == [] and "rsa_roundz" in capsys.readouterr().err


def test_compare_out_refuses_what_it_did_not_write(tiny_policy, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["spiral_lit.evaluation.compare"])
    evaluated = []
    monkeypatch.setattr(compare_module, "evaluate_checkpoint", lambda name, *args: evaluated.append(name) or ({}, {}))
    config = _config(tmp_path, tiny_policy.path)
    args = ["--config", str(config), "--checkpoints", f"hf={tiny_policy.path}"]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "results.csv").write_text("keep me")
    with pytest.raises(UserError, match=r"--out '.*theirs' already holds 1 entry \(results\.csv\).*--overwrite"):
        main([*args, "--out", str(theirs)])
    for out in (tiny_policy.path, tiny_policy.path.parent, config):
        with pytest.raises(UserError, match="would destroy it"):
            main([*args, "--out", str(out), "--overwrite"])
    assert evaluated == [] and (theirs / "results.csv").read_text() == "keep me"


def test_interval_rows_pair_finite_values_by_problem_against_every_earlier_checkpoint() -> None:
    nan = math.nan
    per_problem = {
        "base": {"acc": {"p1": 0.0, "p2": 1.0, "p3": 0.5}, "rate": {"p1": nan, "p2": 0.5, "p3": 0.5}, "only": {}},
        "new": {"acc": {"p3": 0.75, "p2": 1.25, "p1": 0.25}, "rate": {"p1": 1.0, "p2": nan, "p3": 0.5}},
        "same": {"acc": {"p1": 0.0, "p2": 1.0, "p3": 0.5}},
    }
    rows = interval_rows(per_problem)
    # "rate" is finite for both on p3 only (fewer than 2 problems); "only" is the baseline's alone.
    assert rows == [
        {"checkpoint": "new", "baseline": "base", "metric": "acc", "n_problems": 3, "difference": 0.25, "low": 0.25,
         "high": 0.25},
        {"checkpoint": "same", "baseline": "base", "metric": "acc", "n_problems": 3, "difference": 0.0, "low": 0.0,
         "high": 0.0},
        {"checkpoint": "same", "baseline": "new", "metric": "acc", "n_problems": 3, "difference": -0.25, "low": -0.25,
         "high": -0.25},
    ]  # fmt: skip
    assert interval_rows({"base": per_problem["base"]}) == []


def test_compare_writes_intervals_and_prints_the_key_metrics(tiny_policy, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["spiral_lit.evaluation.compare"])
    values = {
        "search/pass@1": {"p1": 0.0, "p2": 1.0}, "aggregation/accuracy": {"p1": 0.5, "p2": 0.5},
        "rsa/accuracy@1": {"p1": 0.0, "p2": 0.0}, "rsa/accuracy@10": {"p1": 0.0, "p2": 0.0},
        "rsa/accuracy@2": {"p1": 0.0, "p2": 0.0},
    }  # fmt: skip
    evaluations = {
        "a": ({}, values),
        "b": ({}, values | {"search/pass@1": {"p1": 1.0, "p2": 1.0}, "rsa/accuracy@10": {"p1": 1.0, "p2": 1.0}}),
    }
    monkeypatch.setattr(compare_module, "evaluate_checkpoint", lambda name, *args: evaluations[name])
    monkeypatch.setattr(compare_module, "FIGURES", {})
    config = str(_config(tmp_path, tiny_policy.path))
    main(["--config", config, "--out", str(tmp_path / "one"), "--checkpoints", f"a={tiny_policy.path}"])
    # One checkpoint: nothing to compare against, the table has its header only.
    assert (tmp_path / "one" / "intervals.csv").read_text().splitlines() == [",".join(INTERVAL_FIELDS)]
    assert json.loads((tmp_path / "one" / "intervals.json").read_text()) == []
    capsys.readouterr()
    out = tmp_path / "two"
    main(["--config", config, "--out", str(out), "--checkpoints", f"a={tiny_policy.path}", f"b={tiny_policy.path}"])
    assert len(json.loads((out / "intervals.json").read_text())) == 5
    lines = [line for line in capsys.readouterr().out.splitlines() if "paired 95% interval" in line]
    assert lines == [
        "[spiral_lit] b - a (paired 95% interval, 2 problems): search/pass@1 +0.500 [+0.000, +1.000], "
        "aggregation/accuracy +0.000 [+0.000, +0.000], rsa/accuracy@10 +1.000 [+1.000, +1.000]"
    ]
