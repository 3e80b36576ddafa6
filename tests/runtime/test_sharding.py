"""sharding.py and the memory features (docs/algorithm.md §8.3), in one process; the 2-process checks are in
test_distributed.py."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from hash_task import VoteTask
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from spiral_lit.prompts import PromptConfig
from spiral_lit.rollout import HFGenerateEngine, SamplingConfig
from spiral_lit.rollout.fsdp import synced_generate
from spiral_lit.runtime.lora import LoraSettings, apply_lora
from spiral_lit.runtime.models import PolicyConfig, load_policy
from spiral_lit.runtime.policy import PolicyRuntime, VerifierConfig
from spiral_lit.runtime.sharding import Fsdp2Settings, decoder_layers, fsdp2_modules, gathered_params, shard_fsdp2
from spiral_lit.training.batching import pack
from spiral_lit.training.strategy import mean_over_ranks


def test_decoder_layers_are_found_through_a_lora_wrapper(tiny_policy) -> None:
    model, _ = load_policy(PolicyConfig(str(tiny_policy.path)))
    assert [type(m).__name__ for m in decoder_layers(model)] == ["LlamaDecoderLayer"] * 2
    pytest.importorskip("peft")
    lora = apply_lora(model, LoraSettings(rank=2))
    assert [type(m).__name__ for m in decoder_layers(lora)] == ["LlamaDecoderLayer"] * 2


def test_gathering_an_unsharded_model_changes_nothing(tiny_policy) -> None:
    model = tiny_policy.model
    assert fsdp2_modules(model) == [] and synced_generate(model) is None
    before = [p for p in model.parameters()]
    with gathered_params(model):
        assert list(model.parameters()) == before


@pytest.fixture
def one_rank_group() -> Iterator[DeviceMesh]:
    """A gloo process group of one rank in this process: FSDP2 shards, gathers and reshards for real, without the
    two processes of test_distributed.py."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _sharded_state(model: torch.nn.Module) -> list[bool]:
    return [isinstance(p, DTensor) for p in model.parameters()]


@pytest.mark.parametrize("reshard_after_forward", [True, False])
def test_gathered_params_are_the_unsharded_policy(loaded_policy, one_rank_group, reshard_after_forward: bool) -> None:
    """What a rollout of an FSDP2 policy relies on (docs/algorithm.md §8.3): inside ``gathered_params`` every
    parameter is whole, the forward and greedy decoding are those of the unsharded policy, and no forward reshards
    (so none needs a collective); outside, the parameters are sharded and the policy's own setting is back."""
    reference, tokenizer = loaded_policy
    model = copy.deepcopy(reference)
    n_layers = len(decoder_layers(model))
    shard_fsdp2(model, one_rank_group, Fsdp2Settings(reshard_after_forward=reshard_after_forward))
    assert len(fsdp2_modules(model)) == n_layers + 1 and synced_generate(model) is False
    assert all(_sharded_state(model))
    ids_BT = torch.tensor([[5, 6, 7, 8, 9, 10]])
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    want = HFGenerateEngine(reference, tokenizer).generate([ids_BT[0].tolist()], n=2, sampling=greedy, seed=0)
    with gathered_params(model):
        assert not any(_sharded_state(model))
        whole = dict(model.named_parameters())
        for name, param in reference.named_parameters():
            assert torch.equal(whole[name], param), name
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids_BT).logits, reference(input_ids=ids_BT).logits)
        got = HFGenerateEngine(model, tokenizer).generate([ids_BT[0].tolist()], n=2, sampling=greedy, seed=0)
        assert [c.token_ids for c in got[0]] == [c.token_ids for c in want[0]]
        assert not any(_sharded_state(model))  # still gathered after every forward of the rollout
    assert all(_sharded_state(model))
    with torch.no_grad():
        model(input_ids=ids_BT)
    assert all(_sharded_state(model)) == reshard_after_forward  # the policy's own setting is back


def test_sharded_runtimes_refuse_the_kv_cache_backend(tiny_policy) -> None:
    with pytest.raises(ValueError, match="model.rollout_backend='kv_cache'.*set model.rollout_backend: hf"):
        PolicyRuntime(
            PolicyConfig(str(tiny_policy.path)), VoteTask(), PromptConfig(), VerifierConfig(num_workers=0),
            backend="kv_cache", sharding="fsdp2",
        )  # fmt: skip


def test_metrics_are_averaged_over_the_ranks_that_report_them() -> None:
    per_rank = [{"reward": 1.0, "loss/search": 2.0}, {"reward": 0.0}, {"reward": 0.5, "loss/search": 4.0}]
    assert mean_over_ranks(per_rank) == {"reward": 0.5, "loss/search": 3.0}


def _gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    batch = pack([[5, 6, 7, 8]], [[9, 10, 11]], pad_id=0)
    model.zero_grad(set_to_none=True)
    model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits.float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_keeps_the_gradient(tiny_policy) -> None:
    plain, _ = load_policy(PolicyConfig(str(tiny_policy.path)))
    checkpointed, _ = load_policy(PolicyConfig(str(tiny_policy.path), gradient_checkpointing=True))
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    want, got = _gradients(plain.train()), _gradients(checkpointed.train())
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bitsandbytes_8bit_adamw_steps_on_cpu(tiny_policy) -> None:
    """bitsandbytes 0.50 runs AdamW8bit on CPU: tensors of >= 4096 elements get uint8 moments."""
    bnb = pytest.importorskip("bitsandbytes")
    model, _ = load_policy(PolicyConfig(str(tiny_policy.path)))
    optimizer = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _gradients(model.train())
    optimizer.step()
    embedding = model.get_input_embeddings().weight
    assert optimizer.state[embedding]["state1"].dtype == torch.uint8
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
