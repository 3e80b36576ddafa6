"""The full training forward: right-padded rows run without the padding mask and give the masked forward's logits
and gradients at every real token."""

from __future__ import annotations

import pytest
import torch

from spiral_lit.training.batching import pack
from spiral_lit.training.forward import full_logits, is_right_padded
from tests.conftest import random_causal_lm

VOCAB, PAD = 61, 0


def _batch():
    """Rows of 5 to 23 tokens, so most are padded, one not at all."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (4, 12, 1, 9)]
    completions = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (7, 11, 4, 2)]
    return pack(prompts, completions, PAD)


def test_is_right_padded_hand_checked() -> None:
    assert is_right_padded(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not is_right_padded(torch.tensor([[1, 1, 1], [0, 1, 1]]))  # left padding
    assert not is_right_padded(torch.tensor([[1, 0, 1]]))  # a hole


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_logits_and_gradients_at_real_tokens_equal_the_padding_masked_forward(family: str, attention: str) -> None:
    model, batch = random_causal_lm(family, attention, VOCAB), _batch()
    real_BT1 = batch.attention_mask_BT[:, 1:].bool()
    masked = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits[:, :-1]
    (masked * batch.completion_mask_BT1.unsqueeze(-1)).sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits = full_logits(model, batch)
    (logits * batch.completion_mask_BT1.unsqueeze(-1)).sum().backward()
    torch.testing.assert_close(logits[real_BT1], masked[real_BT1], atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_left_padded_batch_keeps_its_mask() -> None:
    model, batch = random_causal_lm("llama", "sdpa", VOCAB), _batch()
    flipped = type(batch)(
        batch.input_ids_BT.flip(1),
        batch.attention_mask_BT.flip(1),
        batch.targets_BT1,
        batch.completion_mask_BT1,
        {},
        batch.rows,
    )
    expected = model(input_ids=flipped.input_ids_BT, attention_mask=flipped.attention_mask_BT).logits[:, :-1]
    torch.testing.assert_close(full_logits(model, flipped), expected, atol=0, rtol=0)
