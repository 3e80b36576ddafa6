"""Bad input is refused early with an error that names the key, file, row or value and what was expected
(docs/algorithm.md §8.4). Through the CLI, every case here fails before any model weights are loaded: the
``no_model_load`` fixture turns a weight load into a test failure."""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest
from tiny_run import ROOT, cli_config, edited_policy_copy, fit, make_module
from transformers import AutoTokenizer

from spiral_lit.cli import main
from spiral_lit.reliability.checkpointing import CheckpointMismatchError
from spiral_lit.runtime.models import PolicyConfig, TinyModelConfig, build_tiny_policy, load_policy
from spiral_lit.training.spiral_module import AlgorithmConfig
from spiral_lit.training.update import UpdateConfig
from spiral_lit.training.warm_start import WarmStartModule


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["spiral_lit"])


def _refuse_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("model weights were loaded before the bad input was refused")

    monkeypatch.setattr("spiral_lit.runtime.models.AutoModelForCausalLM.from_pretrained", refuse)


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    _refuse_model_load(monkeypatch)


@pytest.fixture
def config(tiny_policy, tmp_path: Path) -> Path:
    return cli_config(tiny_policy.path, tmp_path, verifier_workers=0)


def _fit(config: Path, *args: str) -> None:
    main(["fit", "--config", str(config), "--trainer.max_steps", "1", *args])


# ----------------------------------------------------------------------------- config keys and sizes
@pytest.mark.parametrize("key", ["--data.batch_sise", "--model.init_args.update.epoks", "--trainer.max_stepz"])
def test_misspelled_keys_are_named(config: Path, key: str, capsys: pytest.CaptureFixture[str], no_model_load) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _fit(config, key, "2")
    assert exit_info.value.code != 0
    assert key.rsplit(".", 1)[-1] in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_sets": 80}, r"algorithm.n_sets=80 but only C\(8, 4\) = 70 distinct sets exist"),
        ({"set_size": 9}, r"algorithm.set_size=9 exceeds algorithm.n_search=8"),
        ({"n_search": 0}, r"algorithm.n_search must be >= 1, got 0"),
        ({"n_agg": -1}, r"algorithm.n_agg must be >= 1, got -1"),
        ({"max_refill_batches": -1}, r"algorithm.max_refill_batches must be >= 0"),
        ({"length_target": 0}, r"algorithm.length_target must be >= 1"),
        ({"n_sets": 1, "n_agg": 1}, r"algorithm.n_sets=1 with algorithm.n_agg=1"),
        ({"algorithm": "grpo", "n_search": 1, "set_size": 1}, r"algorithm.n_search=1: GRPO"),
    ],
)
def test_impossible_spiral_sizes_name_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AlgorithmConfig(**kwargs)


@pytest.mark.parametrize("key", ["epochs", "num_minibatches", "micro_batch_size", "max_nonfinite_steps"])
def test_zero_update_counts_name_the_key(key: str) -> None:
    with pytest.raises(ValueError, match=rf"update.{key} must be >= 1, got 0"):
        UpdateConfig(**{key: 0})


def test_warm_start_nonfinite_limit_names_the_key(tiny_policy) -> None:
    with pytest.raises(ValueError, match=r"model.init_args.max_nonfinite_steps must be >= 1, got 0"):
        WarmStartModule(PolicyConfig(str(tiny_policy.path)), max_nonfinite_steps=0)


def test_more_minibatches_than_sequences(config: Path, no_model_load) -> None:
    # batch 2 x (4 search + 2 sets x 2 aggregations) = 16 sequences per step
    with pytest.raises(ValueError, match=r"update.num_minibatches=17 exceeds the 16 sequences of a step"):
        _fit(config, "--model.init_args.update.num_minibatches", "17")


# ----------------------------------------------------------------------------- token budgets
def test_generation_budget_beyond_the_context(config: Path, no_model_load) -> None:
    with pytest.raises(ValueError, match=r"search traces.*exceeds the 1024-token context.*search_sampling"):
        _fit(config, "--model.init_args.search_sampling.max_new_tokens", "1020")


def test_aggregation_prompt_beyond_the_context(config: Path, no_model_load) -> None:
    # 2 candidates of up to 400 tokens each, plus the prompt, plus 300 new tokens > 1024
    args = ["--model.init_args.search_sampling.max_new_tokens", "400", "--model.init_args.eval.set_size", "0"]
    args += ["--model.init_args.prompts.max_candidate_tokens", "400"]
    args += ["--model.init_args.aggregation_sampling.max_new_tokens", "300"]
    with pytest.raises(ValueError, match=r"training aggregation traces.*algorithm.set_size.*max_candidate_tokens"):
        _fit(config, *args)


# ----------------------------------------------------------------------------- data
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"math: path '.*problems.jsonl' does not exist"),
        ("", r"math: file '.*problems.jsonl' is empty"),
        ('{"question": "1+1", "answer": "2"}\n', r"has no column 'problem' \(set by question_column\)"),
        ('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n', r"line 2: 'answer' \(answer_column\) is empty"),
    ],
)
def test_bad_dataset_files_are_named(
    config: Path, tmp_path: Path, content: str | None, message: str, no_model_load
) -> None:
    path = tmp_path / "problems.jsonl"
    if content is not None:
        path.write_text(content)
    task = ["--data.task", "spiral_lit.tasks.MathDatasetTask", "--data.task.init_args.path", str(path)]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _fit(config, *task, "--data.task.init_args.heldout_size", "1", "--data.heldout_size", "1")


def test_empty_predict_file_is_named(config: Path, tmp_path: Path, no_model_load) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"data.predict_path='.*empty.jsonl' holds no problems"):
        main(["predict", "--config", str(config), "--data.predict_path", str(tmp_path / "empty.jsonl")])


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_without_eos_is_refused_before_the_model_loads(
    tiny_policy, config: Path, tmp_path: Path, no_model_load
) -> None:
    policy = edited_policy_copy(tiny_policy.path, tmp_path / "no_eos", "tokenizer_config.json", eos_token=None)
    assert AutoTokenizer.from_pretrained(policy).eos_token is None
    with pytest.raises(ValueError, match=r"policy.path='.*no_eos': the tokenizer has no EOS token"):
        _fit(config, "--model.init_args.policy.path", str(policy))


def test_tokenizer_without_chat_template_is_refused_before_the_model_loads(
    tiny_policy, config: Path, tmp_path: Path, no_model_load
) -> None:
    policy = tmp_path / "no_template"
    shutil.copytree(tiny_policy.path, policy)
    (policy / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match=r"policy.path='.*no_template': the tokenizer has no chat template"):
        _fit(config, "--model.init_args.policy.path", str(policy))


# ----------------------------------------------------------------------------- checkpoints
def test_missing_checkpoint_is_named_before_anything_is_built(config: Path, tmp_path: Path, no_model_load) -> None:
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*nope.ckpt' does not exist"):
        _fit(config, "--ckpt_path", str(tmp_path / "nope.ckpt"))


@pytest.fixture(scope="module")
def other_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny policy of another architecture (hidden size 32 instead of 64)."""
    out = tmp_path_factory.mktemp("other_policy")
    build_tiny_policy(out, ["12+34=46"] * 20, TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2))
    return out


def test_checkpoint_of_another_policy_is_refused_before_anything_is_built(
    tiny_policy, other_policy: Path, config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fit(tmp_path / "run", make_module(tiny_policy.path), 1)  # a Trainer-API checkpoint: its hparams are dataclasses
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    _refuse_model_load(monkeypatch)
    with pytest.raises(CheckpointMismatchError, match=r"last.ckpt' was trained from model.init_args.policy.path="):
        _fit(config, "--ckpt_path", str(checkpoint), "--model.init_args.policy.path", str(other_policy))


def test_last_checkpoint_of_another_architecture_names_path_and_shapes(other_policy: Path, config: Path) -> None:
    _fit(config)  # the tiny policy's run writes <save_dir>/spiral/checkpoints/last.ckpt
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint '.*last.ckpt' does not belong.*differ in shape"):
        _fit(config, "--model.init_args.policy.path", str(other_policy), "--ckpt_path", "last")


# ----------------------------------------------------------------------------- safety
def test_remote_code_is_not_run_unless_trusted(tiny_policy, tmp_path: Path) -> None:
    auto_map = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    policy = edited_policy_copy(tiny_policy.path, tmp_path / "remote", "config.json", auto_map=auto_map)
    marker = tmp_path / "code_ran"
    (policy / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    assert PolicyConfig(str(policy)).trust_remote_code is False
    load_policy(PolicyConfig(str(policy)))
    assert not marker.exists()


def test_no_eval_or_exec_in_the_package() -> None:
    """Model outputs reach only string functions and the verifiers; nothing in the package evaluates code."""
    calls = []
    for file in sorted((ROOT / "spiral_lit").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                calls.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert calls == []


@pytest.mark.parametrize("role", ["search_sampling", "aggregation_sampling"])
def test_greedy_training_sampling_is_refused_before_the_model_loads(config: Path, role: str, no_model_load) -> None:
    from spiral_lit.errors import UserError

    with pytest.raises(UserError, match=rf"{role}\.temperature"):
        _fit(config, f"--model.init_args.{role}.temperature", "0")


def test_unwritable_checkpoint_directory_is_refused_before_the_model_loads(
    config: Path, tmp_path: Path, no_model_load
) -> None:
    from spiral_lit.errors import UserError

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="a_file"):
        _fit(config, "--trainer.logger.init_args.save_dir", str(blocker / "runs"))
