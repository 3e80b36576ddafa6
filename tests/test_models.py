"""models.py: the tiny policy survives save_pretrained -> load_policy unchanged, and bad configs fail early."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from spiral_lit.models import CHATML_TEMPLATE, SPECIAL_TOKENS, PolicyConfig, TinyModelConfig, load_policy

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
