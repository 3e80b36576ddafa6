"""rollout/weights.py: the weights an engine loads equal the (merged) model's state_dict; fingerprints track updates."""

from __future__ import annotations

import copy

import pytest
import torch

from spiral_lit.rollout.weights import policy_weights, weights_fingerprint


@pytest.fixture
def model(loaded_policy):
    return copy.deepcopy(loaded_policy[0])


def test_plain_model_yields_its_state_dict_with_tied_weights_once(model) -> None:
    got = dict(policy_weights(model))
    state = model.state_dict()
    assert model.config.tie_word_embeddings
    assert set(got) == set(state) - {"lm_head.weight"}
    for name, tensor in got.items():
        assert tensor.data_ptr() == state[name].data_ptr()  # no copies of plain weights


def test_lora_weights_are_merged_without_touching_the_training_model(model) -> None:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(model, config)
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    got = dict(policy_weights(lora))
    merged = copy.deepcopy(lora).merge_and_unload().state_dict()
    assert set(got) == set(merged) - {"lm_head.weight"}
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, merged[name], rtol=0, atol=1e-6, msg=name)
    q = "model.layers.0.self_attn.q_proj.weight"
    layer = lora.get_base_model().model.layers[0].self_attn.q_proj
    delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    assert delta.abs().max() > 1e-3  # the adapter really changes the weight
    torch.testing.assert_close(got[q], layer.base_layer.weight + delta)
    assert all(torch.equal(p, before[n]) for n, p in lora.named_parameters())
    # Disabled adapters give back the base weights.
    with lora.disable_adapter():
        torch.testing.assert_close(dict(policy_weights(lora))[q], layer.base_layer.weight, rtol=0, atol=0)


def test_fingerprint_changes_on_an_optimiser_step_and_on_lora_injection(model) -> None:
    start = weights_fingerprint(model)
    assert weights_fingerprint(model) == start
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    stepped = weights_fingerprint(model)
    assert stepped != start
    peft = pytest.importorskip("peft")
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert weights_fingerprint(model) != stepped
