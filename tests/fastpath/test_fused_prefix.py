"""fused_prefix.py: the written-out shared-prefix forward gives the log-probs and gradients of the full forward.

Reuses the sharp random models and interleaved rows of tests/training/test_prefix_forward.py (a wrong mask or position
moves the log-probs by far more than the tolerance there).
"""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen3ForCausalLM

from spiral_lit.algorithms import token_logprobs
from spiral_lit.fastpath import decode, fused_prefix
from spiral_lit.fastpath.fused_prefix import fused_prefix_logits, fused_prefix_refusal, prompt_runs
from spiral_lit.training import forward
from spiral_lit.training.prefix_forward import cache_forward, pack_shared_prefix
from tests.fastpath.test_decode import tiny_qwen3
from tests.training.test_prefix_forward import (
    PAD,
    VOCAB,
    _assert_close_relative,
    _full_logprobs,
    _grads,
    _model,
    _rows,
)


def _qwen3(**overrides) -> Qwen3ForCausalLM:
    """A sharp random Qwen3 as ``_model`` builds the others (train mode, sdpa), with head_dim 16 (not hidden / heads),
    biased projections and q/k norm weights away from 1 (a weight applied in the wrong head-dim order shows)."""
    return tiny_qwen3(
        VOCAB, hidden_size=32, intermediate_size=64, head_dim=16, bias_std=0.2, attn_implementation="sdpa", **overrides
    ).train()


def _family_model(family: str) -> torch.nn.Module:
    return _qwen3() if family == "qwen3" else _model(family, "sdpa")


def _fused_logprobs(model, prompts, completions) -> list[torch.Tensor]:
    batch = pack_shared_prefix(prompts, completions, PAD)
    logp_BS = token_logprobs(fused_prefix_logits(model, batch), batch.targets_BT1, 0.7)
    return [logp_BS[i, : len(c)] for i, c in enumerate(completions)]


def _long_prompt_rows() -> tuple[list[list[int]], list[list[int]]]:
    """Two prompts of 30 tokens with 2 rows each and completions of 1-7 tokens: the rows of a prompt hold fewer
    tokens (2 x 7) than the prefix width (29), so they take the stacked attention; two 5-token prompts with 5 rows
    each (5 x 7 > 29) take the gathered attention."""
    g = torch.Generator().manual_seed(3)
    long = [torch.randint(1, 61, (30,), generator=g).tolist() for _ in range(2)]
    short = [torch.randint(1, 61, (5,), generator=g).tolist() for _ in range(2)]
    prompts = [long[0]] * 2 + [long[1]] * 2 + [short[0]] * 5 + [short[1]] * 5
    completions = [torch.randint(1, 61, (1 + i % 7,), generator=g).tolist() for i in range(len(prompts))]
    return prompts, completions


def test_prompt_runs_hand_checked() -> None:
    # Rows of prompts 0, 1, 0, 2, 2, 1, 3: prompt 0 has rows 0 and 2, prompt 1 rows 1 and 5, prompt 2 rows 3
    # and 4, prompt 3 row 6: runs of 2 rows for prompts 0-2, then 1 row for prompt 3.
    assert prompt_runs([0, 1, 0, 2, 2, 1, 3]) == ([0, 2, 1, 5, 3, 4, 6], [(0, 3, 2), (3, 4, 1)])
    assert prompt_runs([0, 0, 1]) == ([0, 1, 2], [(0, 1, 2), (1, 2, 1)])
    with pytest.raises(ValueError, match="first appearance"):
        prompt_runs([1, 0])


@pytest.mark.parametrize("rows", [_rows, _long_prompt_rows])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_logprobs_and_gradients_equal_the_full_forward(family: str, rows) -> None:
    model = _family_model(family).train()
    assert fused_prefix_refusal(model) is None
    prompts, completions = rows()
    full = _full_logprobs(model, prompts, completions)
    fused = _fused_logprobs(model, prompts, completions)
    assert (torch.cat(fused) - torch.cat(full)).abs().max() <= 1e-5
    reference = _grads(model, full)
    assert len(reference) == len(list(model.parameters()))
    _assert_close_relative(_grads(model, fused), reference, 1e-5)


def _lora(family: str) -> torch.nn.Module:
    """``family``'s sharp random model with rank-4 adapters on every projection, ``B`` random as well as ``A`` (a
    fresh adapter's zero ``B`` would hide an adapter applied in the wrong head-dim order)."""
    torch.manual_seed(4)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return get_peft_model(_family_model(family), config).train()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_lora_logprobs_and_gradients_equal_the_full_forward(family: str) -> None:
    """``policy.lora``: the adapters run inside the fused forward (Q and K's ``B`` rows permuted with their base
    weights); log-probs and the adapters' gradients (the only trainable parameters) match PEFT's own forward."""
    model = _lora(family)
    assert fused_prefix_refusal(model) is None
    assert forward.training_forward(model, cache_forward(model)).path == "fused_prefix"
    prompts, completions = _long_prompt_rows()
    full = _full_logprobs(model, prompts, completions)
    fused = _fused_logprobs(model, prompts, completions)
    assert (torch.cat(fused) - torch.cat(full)).abs().max() <= 1e-5
    reference = _grads(model, full)
    assert len(reference) == sum(p.requires_grad for p in model.parameters()) > 0
    assert all("lora_" in name for name in reference)
    _assert_close_relative(_grads(model, fused), reference, 1e-5)
    with torch.no_grad(), model.disable_adapter():  # the sharp check: without the adapters the log-probs move far
        base = torch.cat(_full_logprobs(model, prompts, completions))
        assert (base - torch.cat(full)).abs().max() > 1e-2


def test_lora_disabled_adapters_give_the_base_model() -> None:
    """The KL reference switches the adapters off (``disable_adapter``); the fused forward then adds none."""
    model = _lora("llama").eval()
    prompts, completions = _rows()
    with torch.no_grad(), model.disable_adapter():
        assert fused_prefix_refusal(model) is None
        full = torch.cat(_full_logprobs(model, prompts, completions))
        assert (torch.cat(_fused_logprobs(model, prompts, completions)) - full).abs().max() <= 1e-5


def test_qwen3_q_k_norm_order_matters(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above is sharp: q/k norm weights left in the model's head-dim order move the log-probs."""
    model = _qwen3().eval()
    prompts, completions = _rows()
    monkeypatch.setattr(fused_prefix, "_permuted_norm", lambda norm, order: (norm.weight, norm.variance_epsilon))
    with torch.no_grad():
        full = torch.cat(_full_logprobs(model, prompts, completions))
        assert (torch.cat(_fused_logprobs(model, prompts, completions)) - full).abs().max() > 1e-2


def test_both_attention_forms_run_and_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The long-prompt rows take the stacked attention and the short ones the gathered one; forcing either form
    everywhere gives the same log-probs."""
    model = _model("llama", "sdpa").eval()
    prompts, completions = _long_prompt_rows()
    used = []
    for name in ("stacked_attention", "gathered_attention"):
        original = getattr(fused_prefix, name)
        monkeypatch.setattr(fused_prefix, name, lambda *a, f=original, n=name: used.append(n) or f(*a))
    with torch.no_grad():
        both = torch.cat(_fused_logprobs(model, prompts, completions))
        assert set(used) == {"stacked_attention", "gathered_attention"}
        for forced in ("stacked_attention", "gathered_attention"):
            monkeypatch.setattr(fused_prefix, "gathered_attention" if forced == "stacked_attention" else
                                "stacked_attention", getattr(fused_prefix, forced))  # fmt: skip
            assert (torch.cat(_fused_logprobs(model, prompts, completions)) - both).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_weights_match_the_full_forward(family: str) -> None:
    """``policy.dtype: bfloat16`` (no autocast): rotary runs in float32 (complex bf16 does not exist), as in the
    fused decode step; log-probs stay within bf16 rounding of the model's own forward, and gradients flow."""
    model = _family_model(family).to(torch.bfloat16).train()
    assert fused_prefix_refusal(model) is None
    prompts, completions = _rows()
    full = torch.cat(_full_logprobs(model, prompts, completions))
    fused = torch.cat(_fused_logprobs(model, prompts, completions))
    assert torch.isfinite(fused).all()
    # Sharp random weights: log-probs reach -20, and bf16 keeps about 3 significant digits.
    assert ((fused - full).abs() / full.abs().clamp(min=1.0)).max() <= 0.05
    grads = _grads(model, [fused])
    assert all(torch.isfinite(g).all() for g in grads.values()) and len(grads) == len(list(model.parameters()))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("rows", [_rows, _long_prompt_rows], ids=["short", "long"])
def test_bf16_autocast_matches_the_full_forward(family: str, rows) -> None:
    """``precision: bf16-mixed`` (fp32 weights, bf16 autocast): log-probs stay within bf16 rounding of the fp32
    forward, no further from it than the model's own autocast forward is (measured: at most 0.08 against
    log-probs of magnitude up to 10, for both), and the gradients agree with that forward's to ~1% (measured
    0.7-1.4% relative)."""
    model = _family_model(family).train()
    prompts, completions = rows()
    fp32 = torch.cat(_full_logprobs(model, prompts, completions))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_prefix_refusal(model) is None
        full, fused = _full_logprobs(model, prompts, completions), _fused_logprobs(model, prompts, completions)
        full_grads, fused_grads = _grads(model, full), _grads(model, fused)
    scale = fp32.abs().clamp(min=1.0)
    full_error = ((torch.cat(full) - fp32).abs() / scale).max()
    fused_error = ((torch.cat(fused) - fp32).abs() / scale).max()
    assert full_error <= 0.03 and fused_error <= 0.03
    assert fused_error <= full_error + 0.01
    assert len(fused_grads) == len(list(model.parameters()))
    _assert_close_relative(fused_grads, full_grads, 0.03)


def test_single_token_prompts() -> None:
    model = _model("llama", "sdpa").eval()
    prompts, completions = [[5], [5], [7]], [[1, 2, 3], [4], [9, 9]]
    with torch.no_grad():
        full = torch.cat(_full_logprobs(model, prompts, completions))
        assert (torch.cat(_fused_logprobs(model, prompts, completions)) - full).abs().max() <= 1e-5


def test_what_it_does_not_reproduce_is_refused() -> None:
    model = _model("llama", "sdpa")
    dora = get_peft_model(_model("llama", "sdpa"), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert "LoRA variant" in fused_prefix_refusal(dora)
    dropout = get_peft_model(_model("llama", "sdpa"), LoraConfig(r=4, target_modules=["k_proj"], lora_dropout=0.1))
    assert "LoRA dropout" in fused_prefix_refusal(dropout.train())
    # In eval mode too: the path is chosen once, when the updater is built, and training turns the dropout on.
    assert "LoRA dropout" in fused_prefix_refusal(dropout.eval())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert "checkpointing" in fused_prefix_refusal(model)
    hooked = _model("llama", "sdpa")
    hooked.model.layers[0].mlp.register_forward_hook(lambda *args: None)
    assert "hooks" in fused_prefix_refusal(hooked)
    assert "CPU only" in fused_prefix_refusal(_model("llama", "sdpa").to("meta"))  # e.g. a GPU: never measured there
    sliding = _qwen3(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert "sliding-window" in fused_prefix_refusal(sliding)


def test_a_refused_model_takes_the_model_forward_and_says_so_once(monkeypatch, caplog) -> None:
    model = _qwen3().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    monkeypatch.setattr(decode, "_fallbacks_logged", set())
    with caplog.at_level(logging.INFO, logger=forward.__name__):
        paths = [forward.training_forward(model, cache_forward(model)).path for _ in range(2)]
    assert paths == ["shared_prefix", "shared_prefix"]
    (record,) = [r for r in caplog.records if r.name == forward.__name__]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "fused prefix forward not used: activation checkpointing is on; using the shared prefix through the "
        "model's forward"
    )
    assert forward.training_forward(_qwen3(), cache_forward(model)).path == "fused_prefix"
