"""lora.py: LoRA through peft trains only the adapters, samples with them on, and gives the KL reference with
them off (docs/algorithm.md §8.3, §4.4).

A fresh adapter's B matrix is zero, so the adapted model starts equal to the base model; the
tests that need the adapter to matter give B random values first.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hash_task import VoteTask

from spiral_lit.algorithms import token_logprobs
from spiral_lit.prompts import PromptConfig
from spiral_lit.rollout import SamplingConfig
from spiral_lit.runtime.lora import AdapterDisabledReference, LoraSettings, is_lora
from spiral_lit.runtime.models import PolicyConfig, load_policy
from spiral_lit.runtime.policy import PolicyRuntime, VerifierConfig
from spiral_lit.training.batching import pack
from spiral_lit.training.data import ProblemDataModule
from spiral_lit.training.spiral_module import AlgorithmConfig, SpiralModule
from spiral_lit.training.update import UpdateConfig

pytest.importorskip("peft")

LORA = LoraSettings(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "up_proj"])


def _randomise_adapters(model: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


def _logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    batch = pack([prompt], [completion], pad_id=0)
    logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits[:, :-1]
    return token_logprobs(logits, batch.targets_BT1)[0, len(prompt) - 1 :]


@pytest.mark.parametrize("key", ["rank", "alpha", "dropout", "target_modules"])
def test_bad_settings_name_the_key(key: str) -> None:
    bad = {"rank": 0, "alpha": 0.0, "dropout": 1.0, "target_modules": []}[key]
    with pytest.raises(ValueError, match=f"policy.lora.{key}"):
        LoraSettings(**{key: bad})


def test_unknown_target_module_names_the_key(tiny_policy) -> None:
    config = PolicyConfig(str(tiny_policy.path), lora=LoraSettings(target_modules=["no_such_proj"]))
    with pytest.raises(ValueError, match="policy.lora.target_modules"):
        PolicyRuntime(config, VoteTask(), PromptConfig(), VerifierConfig(num_workers=0))


@pytest.mark.parametrize("backend", ["kv_cache", "hf"])
def test_rollouts_use_the_adapter_and_the_reference_switches_it_off(tiny_policy, backend: str) -> None:
    config = PolicyConfig(str(tiny_policy.path), lora=LORA)
    runtime = PolicyRuntime(
        config, VoteTask(), PromptConfig(), VerifierConfig(num_workers=0), backend=backend, kl_reference=True
    )
    model = runtime.model
    assert is_lora(model) and isinstance(runtime.reference, AdapterDisabledReference)
    _randomise_adapters(model)
    model.eval()
    prompt = runtime.renderer.search(runtime.task.problem(0, "train"))
    (completion,) = runtime.engine.generate([prompt], 1, SamplingConfig(max_new_tokens=12), seed=3)[0]
    with torch.no_grad():
        adapted = _logprobs(model, prompt, completion.token_ids)
        reference = _logprobs(runtime.reference, prompt, completion.token_ids)
        base, _ = load_policy(PolicyConfig(str(tiny_policy.path)))
        torch.testing.assert_close(reference, _logprobs(base.eval(), prompt, completion.token_ids))
        assert (adapted - reference).abs().max() > 0.1  # the adapter matters
        # The sampler's log-probs are the adapted model's, and the reference left the adapter on afterwards.
        torch.testing.assert_close(completion.logprobs, adapted, atol=1e-4, rtol=0)
        torch.testing.assert_close(_logprobs(model, prompt, completion.token_ids), adapted)


def test_lora_fit_changes_only_the_adapters(tiny_policy, tmp_path) -> None:
    task = VoteTask(n_terms=2, digits=2)
    module = SpiralModule(
        policy=PolicyConfig(str(tiny_policy.path), lora=LORA, gradient_checkpointing=True),
        task=task,
        algorithm=AlgorithmConfig(n_search=4, n_sets=2, set_size=2, n_agg=2),
        update=UpdateConfig(micro_batch_size=8, kl_coef=0.1),
        search_sampling=SamplingConfig(max_new_tokens=8),
        aggregation_sampling=SamplingConfig(max_new_tokens=8),
        verifier=VerifierConfig(num_workers=0),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    trainer.fit(module, datamodule=ProblemDataModule(task, batch_size=2, heldout_size=4, eval_batch_size=4))

    assert is_lora(module.policy)  # export detects the adapter on module.policy
    adapters = {n for n in before if "lora_" in n}
    assert adapters and {n for n, p in module.policy.named_parameters() if p.requires_grad} == adapters
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for n, p in module.policy.named_parameters() if n in adapters}
    changed = {n for n, p in module.policy.named_parameters() if not torch.equal(p, before[n])}
    # lora_A starts random and B at zero; after two AdamW steps both have moved, and nothing else has.
    assert changed == adapters
