"""prefix_forward.py: encoding each distinct prompt once gives the log-probs and gradients of the full forward.

The models are random but initialised with large weights (``initializer_range=0.2``), so attention is sharp and
a wrong position id or mask changes the log-probs by far more than the tolerance (checked below).
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from spiral_lit.algorithms import token_logprobs
from spiral_lit.rollout import Completion
from spiral_lit.training.batching import pack
from spiral_lit.training.prefix_forward import (
    SharedPrefixBatch,
    cache_forward,
    pack_shared_prefix,
    shared_prefix_logits,
)
from spiral_lit.training.update import PolicyUpdater, TrainSequence, UpdateConfig
from tests.conftest import random_causal_lm

VOCAB = 61
PAD = 0


def _model(family: str, attention: str) -> torch.nn.Module:
    return random_causal_lm(family, attention, VOCAB)


def _rows() -> tuple[list[list[int]], list[list[int]]]:
    """Prompts of 9, 1 (a prompt of one token: empty prefix), 17 and 4 tokens with 2-4 samples each, completions of
    1-11 tokens, rows interleaved (a prompt's rows are not adjacent)."""
    g = torch.Generator().manual_seed(1)
    distinct = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (9, 1, 17, 4)]
    prompts, completions = [], []
    for k in range(4):
        for i, prompt in enumerate(distinct):
            if k < 2 + i % 3:
                prompts.append(prompt)
                length = 1 if (k, i) == (0, 0) else int(torch.randint(2, 12, (1,), generator=g))
                completions.append(torch.randint(1, VOCAB, (length,), generator=g).tolist())
    return prompts, completions


def _full_logprobs(model, prompts, completions) -> list[torch.Tensor]:
    """Per-row completion log-probs from the padded ``prompt + completion`` forward (the reference)."""
    batch = pack(prompts, completions, PAD)
    logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits[:, :-1]
    logp_BT = token_logprobs(logits, batch.targets_BT1, temperature=0.7)
    starts = [len(p) - 1 for p in prompts]
    return [logp_BT[i, start : start + len(c)] for i, (start, c) in enumerate(zip(starts, completions, strict=True))]


def _shared_logprobs(model, prompts, completions, batch: SharedPrefixBatch | None = None) -> list[torch.Tensor]:
    batch = batch or pack_shared_prefix(prompts, completions, PAD)
    logp_BS = token_logprobs(shared_prefix_logits(model, batch, cache_forward(model)), batch.targets_BT1, 0.7)
    return [logp_BS[i, : len(c)] for i, c in enumerate(completions)]


def test_pack_shared_prefix_hand_checked() -> None:
    # Rows: prompt [1, 2, 3] + [5, 6]; prompt [4] + [7]; prompt [1, 2, 3] + [8, 9, 10].
    batch = pack_shared_prefix(
        [[1, 2, 3], [4], [1, 2, 3]], [[5, 6], [7], [8, 9, 10]], pad_id=0, token_values={"old": [
            torch.tensor([0.5, 0.25]), torch.tensor([1.5]), torch.tensor([1.0, 2.0, 3.0])]}, rows=[4, 0, 2],
    )  # fmt: skip
    assert batch.prefix_ids_PL.tolist() == [[1, 2], [0, 0]]  # distinct prompts less their last token
    assert batch.prefix_mask_PL.tolist() == [[True, True], [False, False]]
    assert batch.source_B.tolist() == [0, 1, 0]
    assert batch.suffix_ids_BS.tolist() == [[3, 5, 0], [4, 0, 0], [3, 8, 9]]  # last prompt token + completion[:-1]
    assert batch.suffix_mask_BS.tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    assert batch.suffix_positions_BS.tolist() == [[2, 3, 4], [0, 1, 2], [2, 3, 4]]
    assert batch.targets_BT1.tolist() == [[5, 6, 0], [7, 0, 0], [8, 9, 10]]
    assert batch.completion_mask_BT1.tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    assert batch.values_BT1["old"].tolist() == [[0.5, 0.25, 0.0], [1.5, 0.0, 0.0], [1.0, 2.0, 3.0]]
    assert batch.rows == [4, 0, 2]
    with pytest.raises(ValueError, match="at least one token"):
        pack_shared_prefix([[]], [[1]], pad_id=0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logprobs_equal_the_full_forward(family: str, attention: str) -> None:
    model = _model(family, attention).eval()
    prompts, completions = _rows()
    with torch.no_grad():
        full = torch.cat(_full_logprobs(model, prompts, completions))
        shared = torch.cat(_shared_logprobs(model, prompts, completions))
        assert (shared - full).abs().max() <= 1e-5
        # The check is sharp: continuing every row one position late, or letting it see the prefix padding,
        # moves the log-probs by far more.
        late = pack_shared_prefix(prompts, completions, PAD)
        late.suffix_positions_BS += 1
        assert (torch.cat(_shared_logprobs(model, prompts, completions, late)) - full).abs().max() > 1e-2
        unmasked = pack_shared_prefix(prompts, completions, PAD)
        unmasked.prefix_mask_PL[:] = True
        assert (torch.cat(_shared_logprobs(model, prompts, completions, unmasked)) - full).abs().max() > 1e-2


def test_single_token_prompts_only_run_no_prefix_pass() -> None:
    model = _model("llama", "sdpa").eval()
    prompts, completions = [[5], [5], [7]], [[1, 2, 3], [4], [9, 9]]
    assert pack_shared_prefix(prompts, completions, PAD).prefix_ids_PL.shape == (2, 0)
    with torch.no_grad():
        full = torch.cat(_full_logprobs(model, prompts, completions))
        assert (torch.cat(_shared_logprobs(model, prompts, completions)) - full).abs().max() <= 1e-5


def _grads(model, logprobs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients of a weighted sum of the log-probs (fixed weights of both signs)."""
    g = torch.Generator().manual_seed(2)
    loss = sum((logp * torch.randn(logp.shape, generator=g)).sum() for logp in logprobs)
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_close_relative(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], tol: float) -> None:
    assert grads.keys() == reference.keys()
    for name, ref in reference.items():
        assert ref.norm() > 0, name
        assert (grads[name] - ref).norm() <= tol * ref.norm(), name


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_gradients_equal_the_full_forward(attention: str) -> None:
    model = _model("llama", attention).train()
    prompts, completions = _rows()
    reference = _grads(model, _full_logprobs(model, prompts, completions))
    assert len(reference) == len(list(model.parameters()))
    _assert_close_relative(_grads(model, _shared_logprobs(model, prompts, completions)), reference, 1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_gradients_through_checkpointed_layers_equal_the_full_forward(lora: bool) -> None:
    """Non-reentrant activation checkpointing (``policy.gradient_checkpointing``) keeps the cache and the gradient,
    and the layers' own setting is back afterwards."""
    model = _model("llama", "sdpa").train()
    prompts, completions = _rows()
    if lora:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(3))
    reference = _grads(model, _full_logprobs(model, prompts, completions))
    model.get_base_model().activation_checkpointing_enable() if lora else model.activation_checkpointing_enable()
    layers = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert layers and all(m.gradient_checkpointing for m in layers)
    calls = []
    hook = layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    _assert_close_relative(_grads(model, _shared_logprobs(model, prompts, completions)), reference, 1e-5)
    hook.remove()
    assert len(calls) == 4  # prefix and suffix passes, each replayed in backward: the layers were checkpointed
    assert all(m._can_checkpoint_with_cache is False for m in layers)


def test_lora_model_log_probs_and_adapter_gradients_equal_the_full_forward() -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model("qwen2", "sdpa"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
    assert cache_forward(model).cache_kwarg == "cache"
    prompts, completions = _rows()
    full = _full_logprobs(model, prompts, completions)
    shared = _shared_logprobs(model, prompts, completions)
    assert (torch.cat(shared) - torch.cat(full)).detach().abs().max() <= 1e-5
    reference = _grads(model, full)
    assert reference and all("lora_" in name for name in reference)
    _assert_close_relative(_grads(model, shared), reference, 1e-5)


def test_unsupported_models_are_refused_with_the_reason() -> None:
    sliding = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        use_sliding_window=True, sliding_window=8, max_window_layers=1,
    )  # fmt: skip
    with pytest.raises(NotImplementedError, match="DynamicSlidingWindowLayer"):
        cache_forward(Qwen2ForCausalLM(sliding))
    reentrant = _model("llama", "sdpa")
    reentrant.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(NotImplementedError, match="non-reentrant"):
        cache_forward(reentrant)
    with pytest.warns(UserWarning, match="update.shared_prefix: activation checkpointing must be non-reentrant"):
        updater = PolicyUpdater(reentrant, UpdateConfig(), PAD, 1.0, lambda x: x, lambda x: x, world_size=1)
    assert updater._prefix is None
    with pytest.raises(NotImplementedError, match="forward takes no"):
        cache_forward(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------ PolicyUpdater with shared_prefix on vs off
def _sequences() -> list[TrainSequence]:
    """The rows of :func:`_rows` as traces with off-policy old log-probs (ratios clip), both roles."""
    g = torch.Generator().manual_seed(4)
    out = []
    for i, (prompt, ids) in enumerate(zip(*_rows(), strict=True)):
        old = -torch.rand(len(ids), generator=g) * 6.0
        completion = Completion(token_ids=ids, logprobs=old, finish_reason="length", text="")
        out.append(TrainSequence(prompt, completion, advantage=float(torch.randn(1, generator=g)), role=i % 2))
    return out


def _update(model, config: UpdateConfig, reference=None) -> tuple[dict[str, float], dict, list[torch.Tensor]]:
    """Statistics, the gradient of the one optimiser step, and the (possibly recomputed) old log-probs."""
    grads: dict[str, torch.Tensor] = {}

    def step() -> None:
        grads.update({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})

    sequences = _sequences()
    model.zero_grad(set_to_none=True)
    updater = PolicyUpdater(model, config, PAD, 0.7, lambda x: x, lambda x: x, world_size=1, reference=reference)
    assert (updater._prefix is not None) == config.shared_prefix
    stats = updater.update(sequences, lambda loss: loss.backward(), step, torch.device("cpu"), seed=0)
    model.zero_grad(set_to_none=True)
    return stats, grads, [s.completion.logprobs for s in sequences]


@pytest.mark.parametrize(
    "settings",
    [
        {"micro_batch_size": 32},
        {"micro_batch_size": 3, "entropy_coef": 0.1},  # prompts split over micro-batches
        {"micro_batch_size": 32, "micro_batch_tokens": 60, "recompute_old_logprobs": True, "kl_coef": 0.05},
        {"micro_batch_size": 4, "loss_type": "reinforce_is", "reduction": "seq_mean_token_sum_norm", "norm_const": 16},
    ],
)
def test_updater_with_shared_prefix_makes_the_update_of_the_full_forward(settings: dict) -> None:
    """Same loss and statistics (rel or abs 1e-5), gradient (relative 1e-5 per parameter) and recomputed old
    log-probs (abs 1e-5)."""
    model = _model("llama", "sdpa").train()
    reference = _model("llama", "sdpa").eval() if settings.get("kl_coef") else None
    if reference is not None:
        with torch.no_grad():
            for p in reference.parameters():
                p.mul_(0.9)  # a reference that differs from the policy, so the KL term has a gradient
    off_stats, off_grads, off_old = _update(model, UpdateConfig(shared_prefix=False, **settings), reference)
    on_stats, on_grads, on_old = _update(model, UpdateConfig(shared_prefix=True, **settings), reference)
    assert off_stats.keys() == on_stats.keys()
    for name, value in off_stats.items():
        assert on_stats[name] == pytest.approx(value, rel=1e-5, abs=1e-5), name
    assert len(off_grads) == len(list(model.parameters()))
    _assert_close_relative(on_grads, off_grads, 1e-5)
    for on, off in zip(on_old, off_old, strict=True):
        torch.testing.assert_close(on, off, atol=1e-5, rtol=0)


def test_each_models_forward_is_chosen_once_when_the_updater_is_built(monkeypatch) -> None:
    """The fused path for a plain Llama on CPU, the model's own forward with a KV cache where the fused one is
    refused (a reference that is not a module, activation checkpointing), the full forward without the shared
    prefix; the choice is not re-checked per micro-batch."""
    from spiral_lit.training import forward

    model = _model("llama", "sdpa").train()

    def updater(policy, config: UpdateConfig, reference=None) -> PolicyUpdater:
        return PolicyUpdater(policy, config, PAD, 0.7, lambda x: x, lambda x: x, world_size=1, reference=reference)

    not_a_module = lambda **kwargs: model(**kwargs)  # noqa: E731 - called like the model, as a LoRA reference is
    built = updater(model, UpdateConfig(kl_coef=0.1), reference=not_a_module)
    assert (built._forward.path, built._reference_forward.path) == ("fused_prefix", "shared_prefix")
    assert updater(model, UpdateConfig(shared_prefix=False))._forward.path == "full"
    checkpointed = _model("llama", "sdpa").train()
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert updater(checkpointed, UpdateConfig())._forward.path == "shared_prefix"

    def refuse(model: object) -> str:
        raise AssertionError("the fused path was re-checked after the updater was built")

    monkeypatch.setattr(forward, "fused_prefix_refusal", refuse)
    stats = built.update(_sequences(), lambda loss: loss.backward(), lambda: None, torch.device("cpu"), seed=0)
    assert stats["kl_ref"] >= 0.0
