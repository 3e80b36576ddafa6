"""Hugging Face export (docs/algorithm.md §8.4): from any checkpoint with ``python -m spiral_lit export``, and of
a LoRA policy merged on request or as its adapter; every export reloads with
``AutoModelForCausalLM.from_pretrained`` and gives the logits of the model it was written from."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from tiny_run import cli_config
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from spiral_lit.cli import main as cli_main
from spiral_lit.errors import UserError
from spiral_lit.reliability.callbacks import export_policy
from spiral_lit.reliability.checkpointing import CheckpointMismatchError, load_checkpoint_file
from spiral_lit.runtime.models import PolicyConfig, TinyModelConfig, build_tiny_policy, load_policy
from spiral_lit.tools.export import main as export_main


@pytest.fixture(scope="module")
def fitted(tiny_policy, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config, last checkpoint) of a 2-step CLI run of the tiny policy."""
    out = tmp_path_factory.mktemp("fitted")
    config = cli_config(tiny_policy.path, out, verifier_workers=0)
    with mock.patch.object(sys, "argv", ["spiral_lit"]):
        cli_main(["fit", "--config", str(config), "--trainer.max_steps", "2"])
    return config, out / "spiral" / "checkpoints" / "last.ckpt"


def _logits(model: torch.nn.Module, tokenizer) -> torch.Tensor:  # noqa: ANN001
    messages = [{"role": "user", "content": "12+34\nSolve step by step."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model.eval()(input_ids=ids["input_ids"]).logits


def test_export_from_a_checkpoint_reloads_with_the_same_logits(tiny_policy, fitted, tmp_path: Path) -> None:
    config, checkpoint = fitted
    out = export_main(["--config", str(config), "--ckpt_path", str(checkpoint), "--out", str(tmp_path / "hf")])
    exported = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)

    trained, original_tokenizer = load_policy(PolicyConfig(str(tiny_policy.path)))
    state = load_checkpoint_file(checkpoint)["state_dict"]
    trained.load_state_dict({k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")})
    assert torch.equal(_logits(exported, tokenizer), _logits(trained, original_tokenizer))
    assert not torch.equal(_logits(exported, tokenizer), _logits(tiny_policy.model, original_tokenizer))  # trained
    assert tokenizer.chat_template == original_tokenizer.chat_template
    assert tokenizer.eos_token == original_tokenizer.eos_token
    # The end-of-fit export (HFExport) holds the same final weights.
    at_fit_end = AutoModelForCausalLM.from_pretrained(checkpoint.parents[1] / "hf")
    assert torch.equal(_logits(at_fit_end, tokenizer), _logits(exported, tokenizer))


def test_export_through_the_one_command_line(fitted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m spiral_lit export ...``: the same export, while ``sys.argv`` holds the tool's own command line."""
    config, checkpoint = fitted
    args = ["--config", str(config), "--ckpt_path", str(checkpoint), "--out", str(tmp_path / "hf")]
    monkeypatch.setattr(sys, "argv", ["spiral_lit", "export", *args])
    out = cli_main(["export", *args])
    exported, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    at_fit_end = AutoModelForCausalLM.from_pretrained(checkpoint.parents[1] / "hf")
    assert out == tmp_path / "hf" and torch.equal(_logits(exported, tokenizer), _logits(at_fit_end, tokenizer))


def test_export_refuses_a_checkpoint_of_another_model(fitted, tmp_path: Path) -> None:
    config, checkpoint = fitted
    other = tmp_path / "other"
    build_tiny_policy(other, ["12+34=46"] * 20, TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=2))
    args = ["--config", str(config), "--ckpt_path", str(checkpoint), "--out", str(tmp_path / "hf")]
    with pytest.raises(CheckpointMismatchError, match=rf"{checkpoint.name}.*does not belong.*differ in shape"):
        export_main([*args, "--model.init_args.policy.path", str(other)])
    with pytest.raises(FileNotFoundError, match=r"checkpoint '.*missing\.ckpt' does not exist"):
        export_main(["--config", str(config), "--ckpt_path", str(tmp_path / "missing.ckpt"), "--out", str(other)])
    assert not (tmp_path / "hf").exists()


def test_lora_policy_exports_merged_on_request_and_as_its_adapter_otherwise(tiny_policy, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base, tokenizer = load_policy(PolicyConfig(str(tiny_policy.path)))
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:  # a fresh adapter is zero: make it change the model
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    expected = _logits(lora, tokenizer)
    assert not torch.allclose(expected, _logits(tiny_policy.model, tokenizer))
    module = SimpleNamespace(policy=lora, runtime=SimpleNamespace(tokenizer=tokenizer))

    merged_dir = export_policy(module, tmp_path / "merged", merge_lora=True)
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert isinstance(merged, PreTrainedModel) and not isinstance(merged, peft.PeftModel)
    torch.testing.assert_close(_logits(merged, tokenizer), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(module.policy, peft.PeftModel)  # merged on a copy: the trained adapter is untouched
    assert torch.equal(_logits(lora, tokenizer), expected)

    adapter_dir = export_policy(module, tmp_path / "adapter")
    assert (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "model.safetensors").exists()
    with_adapter = AutoModelForCausalLM.from_pretrained(adapter_dir)  # base from the adapter's config + adapter
    torch.testing.assert_close(_logits(with_adapter, tokenizer), expected, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(adapter_dir).chat_template == tokenizer.chat_template


def _refuse_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the output location was refused")

    monkeypatch.setattr("spiral_lit.runtime.models.AutoModelForCausalLM.from_pretrained", refuse)


def test_export_refuses_a_directory_it_did_not_write_before_loading_anything(
    fitted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, checkpoint = fitted
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    args = ["--config", str(config), "--ckpt_path", str(checkpoint), "--out", str(theirs)]
    with monkeypatch.context() as patch:
        _refuse_model_load(patch)
        with pytest.raises(UserError, match=r"--out '.*theirs' already holds 1 entry \(notes\.txt\).*--overwrite"):
            export_main(args)
    assert (theirs / "notes.txt").read_text() == "keep me"
    export_main([*args, "--overwrite"])
    assert AutoModelForCausalLM.from_pretrained(theirs) is not None and not (theirs / "notes.txt").exists()
    export_main(args)  # its own previous export: replaced without the flag
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs"]  # no temporary sibling left behind


def test_export_never_replaces_the_run_directory_or_its_inputs(fitted, tmp_path: Path, monkeypatch) -> None:
    config, checkpoint = fitted
    run = tmp_path / "run"
    shutil.copytree(checkpoint.parents[1], run)  # a copy: the module's fixture stays intact
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    own_checkpoint = run / "checkpoints" / "last.ckpt"
    _refuse_model_load(monkeypatch)
    for out, what in ((run, "contains .*last.ckpt, which is the checkpoint"), (own_checkpoint, "is the checkpoint")):
        with pytest.raises(UserError, match=rf"--out '.*' {what}.*--overwrite does not change this"):
            export_main(["--config", str(config), "--ckpt_path", str(own_checkpoint), "--out", str(out), "--overwrite"])
    with pytest.raises(UserError, match=r"is the config .*--overwrite does not change this"):
        export_main(["--config", str(config), "--ckpt_path", str(checkpoint), "--out", str(config), "--overwrite"])
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
