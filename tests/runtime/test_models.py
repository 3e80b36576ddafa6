"""models.py: the tiny policy survives save_pretrained -> load_policy unchanged, and bad configs fail early."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from transformers import AutoConfig, AutoTokenizer

from spiral_lit.errors import UserError
from spiral_lit.runtime.models import (
    CHATML_TEMPLATE,
    SPECIAL_TOKENS,
    PolicyConfig,
    TinyModelConfig,
    build_tiny_policy,
    check_policy_files,
    context_length,
    load_policy,
    load_tokenizer,
)

MESSAGES = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "123+456+789\nSolve step by step."},
    {"role": "assistant", "content": "123+456=579\n579+789=1368\n<answer>1368</answer>"},
]


def test_special_tokens_come_first_in_the_vocabulary(loaded_policy) -> None:
    _, tokenizer = loaded_policy
    # The BPE trainer puts the special tokens before the byte alphabet, in the order given.
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == SPECIAL_TOKENS == ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|pad|>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.padding_side == "left"
    assert tokenizer.chat_template == CHATML_TEMPLATE


def test_reloaded_tokenizer_gives_the_same_ids_for_chat_text(tiny_policy, loaded_policy) -> None:
    _, loaded = loaded_policy
    trained = tiny_policy.tokenizer
    text = trained.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == loaded.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou add numbers.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = trained.encode(text, add_special_tokens=False)
    assert loaded.encode(text, add_special_tokens=False) == ids
    # Each special token is one id, never split into bytes: 4 <|im_start|> and 3 <|im_end|>.
    assert ids.count(1) == 4
    assert ids.count(2) == 3
    assert ids[0] == 1


def test_digits_are_single_tokens(loaded_policy) -> None:
    _, tokenizer = loaded_policy
    digit_ids = [tokenizer.encode(d, add_special_tokens=False) for d in "0123456789"]
    assert all(len(ids) == 1 for ids in digit_ids)
    assert len({ids[0] for ids in digit_ids}) == 10
    # Digits never merge with each other, so a number is one token per digit.
    ids = tokenizer.encode("9876543210", add_special_tokens=False)
    assert ids == [digit_ids[int(d)][0] for d in "9876543210"]


def test_decode_round_trips(loaded_policy) -> None:
    _, tokenizer = loaded_policy
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    odd = "  spaces, tabs\tand unicode: é → 42 "
    assert tokenizer.decode(tokenizer.encode(odd, add_special_tokens=False)) == odd


def test_reloaded_model_gives_identical_logits(tiny_policy, loaded_policy) -> None:
    model, tokenizer = loaded_policy
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert next(model.parameters()).dtype == torch.float32
    text = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        expected = tiny_policy.model(ids).logits
        actual = model(ids).logits
    assert torch.equal(actual, expected)
    built = dict(tiny_policy.model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, built[name]), name


def test_missing_local_path_names_it() -> None:
    with pytest.raises(FileNotFoundError, match="runs/does/not/exist"):
        PolicyConfig(path="runs/does/not/exist")


def test_empty_path_is_rejected() -> None:
    with pytest.raises(ValueError, match="policy.path"):
        PolicyConfig(path="")


def test_tokenizer_without_chat_template_is_rejected(tiny_policy, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy.path)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    assert not (tmp_path / "chat_template.jinja").exists()
    with pytest.raises(ValueError, match="chat template"):
        load_policy(PolicyConfig(path=str(tmp_path)))


def test_tiny_config_names_the_bad_key() -> None:
    with pytest.raises(ValueError, match=r"tiny\.hidden_size \(65\).*tiny\.num_heads \(2\)"):
        TinyModelConfig(hidden_size=65, num_heads=2)
    with pytest.raises(ValueError, match=r"tiny\.vocab_size"):
        TinyModelConfig(vocab_size=100)
    with pytest.raises(ValueError, match=r"tiny\.num_kv_heads \(3\).*tiny\.num_heads \(4\)"):
        TinyModelConfig(num_kv_heads=3)


def test_tiny_model_with_grouped_query_attention(tmp_path: Path) -> None:
    """``num_kv_heads`` gives the saved Llama fewer key/value heads (a smaller KV cache to read per decode step)."""
    model, _ = build_tiny_policy(
        tmp_path, ["12+34=46"] * 20, TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_kv_heads=2)
    )
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
    assert AutoConfig.from_pretrained(tmp_path).num_key_value_heads == 2


# ----------------------------------------------------------------------------- model paths
def _copy_without(tiny_policy, tmp_path: Path, *names: str) -> Path:
    """The tiny policy's directory without the files ``names``."""
    out = tmp_path / "policy"
    shutil.copytree(tiny_policy.path, out)
    for name in names:
        (out / name).unlink()
    return out


def test_missing_local_path_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"model\.init_args\.policy\.path='runs/does/not/exist'"):
        PolicyConfig(path="runs/does/not/exist")


def test_relative_typo_under_an_existing_directory_is_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``runs/tiyn`` has the shape of a hub id, but ``runs/`` is here: it is a typo, not a hub repository."""
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'runs/tiyn' does not exist.*did you mean 'runs/tiny'"):
        PolicyConfig(path="runs/tiyn")
    assert PolicyConfig(path="runs/tiny").path == "runs/tiny"


@pytest.mark.parametrize("path", ["a/b/c", "./x", "~/no_such_model_dir", "tiny", "org/name with space", "org\\name"])
def test_paths_that_cannot_be_hub_ids_must_exist(path: str) -> None:
    with pytest.raises(UserError, match=re.escape(repr(path))):
        PolicyConfig(path=path)


def test_a_file_is_not_a_model_directory(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"is a file, not a directory"):
        PolicyConfig(path=str(tmp_path / "model.safetensors"))


def test_directory_with_only_config_names_the_missing_tokenizer_files(tiny_policy, tmp_path: Path) -> None:
    out = tmp_path / "only_config"
    out.mkdir()
    shutil.copy(tiny_policy.path / "config.json", out)
    with pytest.raises(UserError, match=r"only_config'.*no tokenizer.*tokenizer\.json"):
        load_tokenizer(PolicyConfig(path=str(out)))


def test_directory_without_weights_names_them(tiny_policy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = _copy_without(tiny_policy, tmp_path, "model.safetensors")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("transformers was asked for the weights")

    monkeypatch.setattr("spiral_lit.runtime.models.AutoModelForCausalLM.from_pretrained", refuse)
    with pytest.raises(UserError, match=r"no weights.*model\.safetensors.*It holds: .*config\.json.*tokenizer\.json"):
        load_policy(PolicyConfig(path=str(policy)))
    with pytest.raises(UserError, match=r"no weights"):
        check_policy_files(PolicyConfig(path=str(policy)))


def test_directory_without_config_names_it(tiny_policy, tmp_path: Path) -> None:
    policy = _copy_without(tiny_policy, tmp_path, "config.json")
    with pytest.raises(UserError, match=r"no config\.json \(nor adapter_config\.json\)"):
        check_policy_files(PolicyConfig(path=str(policy)))


def test_complete_directory_passes(tiny_policy) -> None:
    check_policy_files(PolicyConfig(path=str(tiny_policy.path)))


# ----------------------------------------------------------------------------- hub ids: no minute of retries
class _Unreachable(Exception):
    """What an HTTP client raises when it cannot connect."""


_NOT_FOUND = SimpleNamespace(headers={}, status_code=404, request=None, url="")
"""Enough of an HTTP response for huggingface_hub's error classes."""


def _hub(monkeypatch: pytest.MonkeyPatch, outcome: Exception | None, cached: bool) -> list[str]:
    """Replace the hub probe with ``outcome`` (None: the repository exists) and the cache look-up; returns the
    ids probed."""
    probed: list[str] = []

    def model_info(self: object, repo_id: str, **kwargs: object) -> object:
        probed.append(repo_id)
        if outcome is not None:
            raise outcome
        return object()

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", model_info)
    found = "/cache/config.json" if cached else None
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: found)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    return probed


def test_unreachable_hub_without_a_cached_copy_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    probed = _hub(monkeypatch, _Unreachable("Name or service not known"), cached=False)
    with pytest.raises(UserError, match=r"policy\.path='someorg/some-model'.*cannot reach.*HF_HUB_OFFLINE"):
        load_tokenizer(PolicyConfig(path="someorg/some-model"))
    assert probed == ["someorg/some-model"]


def test_unreachable_hub_with_a_cached_copy_loads_it_without_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    _hub(monkeypatch, _Unreachable("Name or service not known"), cached=True)
    with pytest.warns(UserWarning, match="cached copy"):
        assert check_policy_files(PolicyConfig(path="someorg/some-model"))["local_files_only"] is True


def test_unknown_hub_repository_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _hub(monkeypatch, RepositoryNotFoundError("404", response=_NOT_FOUND), cached=False)
    with pytest.raises(UserError, match=r"policy\.path='someorg/some-model' is not a local directory, and no hub"):
        load_tokenizer(PolicyConfig(path="someorg/some-model"))


def test_unknown_hub_revision_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _hub(monkeypatch, RevisionNotFoundError("404", response=_NOT_FOUND), cached=False)
    with pytest.raises(UserError, match=r"policy\.revision='nope'"):
        load_tokenizer(PolicyConfig(path="someorg/some-model", revision="nope"))


def test_offline_mode_without_a_cached_copy_fails_without_probing(monkeypatch: pytest.MonkeyPatch) -> None:
    probed = _hub(monkeypatch, None, cached=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"HF_HUB_OFFLINE is set.*not in the local cache"):
        context_length(PolicyConfig(path="someorg/some-model"))
    assert probed == []


def test_reachable_hub_loads_through_the_auto_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub path stays the real one: ``AutoTokenizer.from_pretrained`` on the id, no local-only flag."""
    probed = _hub(monkeypatch, None, cached=False)
    calls: list[tuple[str, dict]] = []

    def from_pretrained(path: str, **kwargs: object) -> None:
        calls.append((path, kwargs))
        raise _Unreachable("stop here")

    monkeypatch.setattr("spiral_lit.runtime.models.AutoTokenizer.from_pretrained", from_pretrained)
    with pytest.raises(_Unreachable):
        load_tokenizer(PolicyConfig(path="someorg/some-model", revision="v1"))
    assert probed == ["someorg/some-model"]
    assert calls == [("someorg/some-model", {"trust_remote_code": False, "revision": "v1"})]


def test_unreachable_hub_fails_in_seconds_through_the_real_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port where nothing listens: huggingface_hub's downloads would retry for about a minute."""
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"'spiral-lit-tests/no-such-model'.*cannot reach"):
        load_tokenizer(PolicyConfig(path="spiral-lit-tests/no-such-model"))
    assert time.monotonic() - start < 10


def test_unreachable_hub_loads_tokenizer_and_model_from_the_cache_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' own look-up of a PEFT adapter config ignores ``local_files_only``, so it is passed there too."""
    _hub(monkeypatch, _Unreachable("Name or service not known"), cached=True)
    calls: dict[str, dict] = {}
    tokenizer = SimpleNamespace(chat_template="x", eos_token_id=2, eos_token="e", pad_token_id=0, padding_side="right")

    def tokenizer_from_pretrained(path: str, **kwargs: object) -> SimpleNamespace:
        calls["tokenizer"] = kwargs
        return tokenizer

    def model_from_pretrained(path: str, **kwargs: object) -> None:
        calls["model"] = kwargs
        raise _Unreachable("stop here")

    monkeypatch.setattr("spiral_lit.runtime.models.AutoTokenizer.from_pretrained", tokenizer_from_pretrained)
    monkeypatch.setattr("spiral_lit.runtime.models.AutoModelForCausalLM.from_pretrained", model_from_pretrained)
    with pytest.warns(UserWarning, match="cached copy"), pytest.raises(_Unreachable):
        load_policy(PolicyConfig(path="someorg/some-model"))
    assert calls["tokenizer"]["local_files_only"] is True
    assert calls["model"]["local_files_only"] is True
    assert calls["model"]["adapter_kwargs"] == {"local_files_only": True}


@pytest.mark.parametrize("key", ["hidden_size", "intermediate_size", "num_layers", "num_heads"])
def test_tiny_model_sizes_must_be_positive(key: str) -> None:
    from spiral_lit.errors import UserError

    with pytest.raises(UserError, match=rf"tiny\.{key} must be >= 1"):
        TinyModelConfig(**{key: -4})
