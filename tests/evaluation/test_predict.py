"""predict.py and ``python -m spiral_lit predict``: each scaffold's records, and a JSONL round trip through the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hash_task import VoteTask

from spiral_lit.cli import main
from spiral_lit.errors import UserError
from spiral_lit.evaluation.held_out import EvalConfig
from spiral_lit.evaluation.metrics import majority_vote
from spiral_lit.evaluation.predict import predict_problems
from spiral_lit.prompts import PromptConfig, PromptRenderer
from spiral_lit.reliability.callbacks import PredictionWriter
from spiral_lit.rollout import KVCacheEngine, SamplingConfig
from spiral_lit.runtime.policy import Sampler
from spiral_lit.tasks.verify import Verifier
from spiral_lit.training.data import read_predict_problems

SAMPLING = SamplingConfig(max_new_tokens=5, temperature=1.0)


def _problems_file(path: Path) -> Path:
    rows = [
        {"id": "with-answer", "question": "What is 12+30?", "answer": "1"},
        {"question": "What is 40+2?"},
        {"id": 3, "question": "What is 1+1?", "answer": 2},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("scaffold", ["single", "majority", "rsa"])
def test_each_scaffold_answers_every_problem(loaded_policy, tmp_path: Path, scaffold: str) -> None:
    model, tokenizer = loaded_policy
    task = VoteTask(n_terms=2, digits=2)
    renderer = PromptRenderer(tokenizer, PromptConfig(), task.answer_instruction)
    config = EvalConfig(
        n_samples=3, pass_k=[1], set_size=0, rsa_population=3, rsa_set_size=2, rsa_rounds=2, predict_scaffold=scaffold
    )
    problems = read_predict_problems(str(_problems_file(tmp_path / "p.jsonl")))
    with Verifier(task, num_workers=0) as verifier:
        records = predict_problems(
            Sampler(KVCacheEngine(model, tokenizer), renderer, verifier), problems, config, SAMPLING, SAMPLING
        )
    assert [r["id"] for r in records] == ["with-answer", "predict/1", "3"]
    assert ["correct" in r for r in records] == [True, False, True]  # no reference answer, no verdict
    n_traces = {"single": 1, "majority": 3, "rsa": 3}[scaffold]
    for record, problem in zip(records, problems, strict=True):
        assert record["question"] == problem.question
        assert len(record["traces"]) == n_traces
        assert record["answer"] in {"0", "1", "2"}  # VoteTask's answers
        if "correct" in record:
            assert record["correct"] == (record["answer"] == problem.answer)
        if scaffold == "rsa":
            assert [len(members) for members in record["aggregations"]] == [3, 3]
            assert record["answer"] == majority_vote([task.extract_answer(t) for t in record["aggregations"][-1]])
        else:
            assert "aggregations" not in record


def _config(tmp_path: Path, policy_dir: Path, eval_config: dict) -> Path:
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path)},
        "model": {
            "class_path": "spiral_lit.SpiralModule",
            "init_args": {
                "policy": {"path": str(policy_dir)},
                "search_sampling": {"max_new_tokens": 5},
                "aggregation_sampling": {"max_new_tokens": 5},
                "verifier": {"num_workers": 0},
                "eval": eval_config,
            },
        },
        "data": {"task": {"class_path": "hash_task.VoteTask", "init_args": {"n_terms": 2, "digits": 2}},
                 "heldout_size": 2, "eval_batch_size": 2},
    }  # fmt: skip
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_predict_jsonl_round_trip_through_the_cli(tiny_policy, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["spiral_lit"])
    eval_config = {"n_samples": 3, "pass_k": [1], "set_size": 0, "predict_scaffold": "majority"}
    config = _config(tmp_path, tiny_policy.path, eval_config)
    problems, out = _problems_file(tmp_path / "problems.jsonl"), tmp_path / "out" / "answers.jsonl"
    main(["predict", "--config", str(config), "--data.predict_path", str(problems),
          "--prediction_writer.output_path", str(out)])  # fmt: skip
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["with-answer", "predict/1", "3"]
    assert [sorted(r) for r in records] == [
        ["answer", "correct", "id", "question"],
        ["answer", "id", "question"],
        ["answer", "correct", "id", "question"],
    ]
    main(["predict", "--config", str(config), "--data.predict_path", str(problems),
          "--prediction_writer.output_path", str(out), "--prediction_writer.include_traces", "true"])  # fmt: skip
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(r["traces"]) for r in again] == [3, 3, 3]
    assert [r["answer"] for r in again] == [r["answer"] for r in records]  # seeds come from the problem ids


def test_predict_names_a_bad_input_file(tiny_policy, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["spiral_lit"])
    config = _config(tmp_path, tiny_policy.path, {"n_samples": 1, "pass_k": [1], "set_size": 0})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok"}\n{"answer": "1"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl.*line 2.*\"question\""):
        main(["predict", "--config", str(config), "--data.predict_path", str(bad)])


def test_predict_never_writes_over_its_input_or_a_file_it_did_not_write(
    tiny_policy, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["spiral_lit"])
    config = _config(tmp_path, tiny_policy.path, {"n_samples": 1, "pass_k": [1], "set_size": 0})
    problems = _problems_file(tmp_path / "problems.jsonl")
    original = problems.read_text()
    args = ["predict", "--config", str(config), "--data.predict_path", str(problems)]
    for overwrite in ("false", "true"):  # the input: refused even with overwrite
        with pytest.raises(UserError, match=r"problems\.jsonl' is the predict input \(data\.predict_path\)"):
            main([*args, "--prediction_writer.output_path", str(problems), "--prediction_writer.overwrite", overwrite])
    assert problems.read_text() == original
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_text('{"kept": true}\n')
    with pytest.raises(UserError, match=r"theirs\.jsonl' already holds a file.*--prediction_writer\.overwrite true"):
        main([*args, "--prediction_writer.output_path", str(theirs)])
    assert theirs.read_text() == '{"kept": true}\n'
    main([*args, "--prediction_writer.output_path", str(theirs), "--prediction_writer.overwrite", "true"])
    assert [json.loads(line)["id"] for line in theirs.read_text().splitlines()] == ["with-answer", "predict/1", "3"]
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []  # written aside, then moved in


def test_prediction_writer_refuses_its_input_even_with_overwrite(tmp_path: Path) -> None:
    problems = _problems_file(tmp_path / "problems.jsonl")
    trainer = SimpleNamespace(
        global_rank=0, log_dir=str(tmp_path), datamodule=SimpleNamespace(predict_path=str(problems)), callbacks=[],
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
    )  # fmt: skip
    for overwrite in (False, True):
        writer = PredictionWriter(output_path=str(problems), overwrite=overwrite)
        with pytest.raises(UserError, match=r"problems\.jsonl' is the predict input \(data\.predict_path\)"):
            writer.setup(trainer, None, "predict")  # type: ignore[arg-type]
    PredictionWriter(output_path=str(tmp_path / "answers.jsonl")).setup(trainer, None, "predict")  # type: ignore[arg-type]
