"""fastpath/decode.py: the fused decode step gives the rollouts of the model's own forward."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from rollout_checks import EOSBias, greedy_reference, training_logprobs
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from spiral_lit.fastpath import decode
from spiral_lit.fastpath.decode import FusedDecoder, _Projection, fused_decode_refusal
from spiral_lit.rollout import KVCacheEngine, SamplingConfig


@pytest.fixture(scope="module")
def llama(loaded_policy):
    return loaded_policy


@pytest.fixture(scope="module")
def qwen2(loaded_policy):
    """A tiny random Qwen2 on the same tokenizer: biased Q/K/V projections, 2 query heads per KV head."""
    _, tokenizer = loaded_policy
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        use_sliding_window=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
        with torch.no_grad():  # initialised at zero: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tiny_qwen3(
    vocab_size: int,
    hidden_size: int = 64,
    intermediate_size: int = 96,
    head_dim: int = 32,
    bias_std: float = 0.5,
    **overrides,
) -> Qwen3ForCausalLM:
    """A tiny random Qwen3 in eval mode: a head_dim of its own (4 heads x 32 widen q_proj past hidden size 64),
    biased projections, and q/k norm weights away from 1, so a q/k norm weight applied in the wrong head-dim order
    moves the logits. tests/fastpath/test_fused_prefix.py builds its smaller one here too."""
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        attention_bias=True,
        initializer_range=0.2,
        **{"max_position_embeddings": 512, **overrides},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).eval()
        with torch.no_grad():  # initialised at zero and one: make them matter
            for layer in model.model.layers:
                attn = layer.self_attn
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                    proj.bias.normal_(0, bias_std)
                for norm in (attn.q_norm, attn.k_norm):
                    norm.weight.normal_(1, 0.5)
    return model


@pytest.fixture(scope="module")
def qwen3(loaded_policy):
    """A tiny random Qwen3 on the same tokenizer (see :func:`tiny_qwen3`)."""
    _, tokenizer = loaded_policy
    model = tiny_qwen3(len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _prompts(tokenizer) -> list[list[int]]:
    """Three lengths (left padding in the shared prefill); the first prompt twice (uneven rows per prompt)."""
    texts = ["12+7=", "What is 345 + 12 + 9? Think step by step.", "Sum 4 and 5"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    assert len({len(i) for i in ids}) == 3
    return [*ids, ids[0]]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_fused_decode_gives_the_rollouts_of_the_model_forward(request, family: str, temperature: float) -> None:
    model, tokenizer = request.getfixturevalue(family)
    assert fused_decode_refusal(model) is None
    prompts = _prompts(tokenizer)
    sampling = SamplingConfig(max_new_tokens=12, temperature=temperature)
    # Sampled traces end at varied steps (so compaction runs); greedy ones would all stop at once.
    handle = model.lm_head.register_forward_hook(EOSBias(tokenizer.eos_token_id, bias=3.0 if temperature else 0.0))
    try:
        fused = KVCacheEngine(model, tokenizer, compact_every=1).generate(prompts, n=3, sampling=sampling, seed=3)
        plain = KVCacheEngine(model, tokenizer, compact_every=1, fused_decode=False).generate(
            prompts, n=3, sampling=sampling, seed=3
        )
        rows = [(p, c) for p, group in zip(prompts, fused, strict=True) for c in group]
        want = training_logprobs(model, [p for p, _ in rows], [c.token_ids for _, c in rows], temperature or 1.0)
    finally:
        handle.remove()
    assert [[c.token_ids for c in g] for g in fused] == [[c.token_ids for c in g] for g in plain]
    if temperature:
        assert len({c.num_tokens for g in fused for c in g}) > 2, "traces should end at varied steps (compaction)"
    for g1, g2 in zip(fused, plain, strict=True):
        for c1, c2 in zip(g1, g2, strict=True):
            assert c1.finish_reason == c2.finish_reason
            torch.testing.assert_close(c1.logprobs, c2.logprobs, atol=1e-5, rtol=0)
    for (_, completion), logprobs in zip(rows, want, strict=True):
        torch.testing.assert_close(completion.logprobs, logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_fused_greedy_rollouts_equal_model_generate(request, family: str) -> None:
    model, tokenizer = request.getfixturevalue(family)
    assert fused_decode_refusal(model) is None
    prompts = _prompts(tokenizer)[:3]
    got = KVCacheEngine(model, tokenizer).generate(prompts, n=1, sampling=SamplingConfig(12, temperature=0.0), seed=0)
    for prompt, (completion,) in zip(prompts, got, strict=True):
        assert completion.token_ids == greedy_reference(model, tokenizer, prompt, 12)


def test_qwen3_q_k_norms_are_applied_in_the_permuted_order(qwen3, monkeypatch) -> None:
    """The check above is sharp: the q/k norm weights left in the model's head-dim order change the rollouts."""
    model, tokenizer = qwen3
    prompts = _prompts(tokenizer)[:3]
    sampling = SamplingConfig(12, temperature=0.0)
    plain = KVCacheEngine(model, tokenizer, fused_decode=False).generate(prompts, n=1, sampling=sampling, seed=0)
    unpermuted = FusedDecoder._qk_norm

    def wrong_order(self, attn):
        interleave, self.interleave_D = self.interleave_D, torch.arange(self.head_dim)
        try:
            return unpermuted(self, attn)
        finally:
            self.interleave_D = interleave

    monkeypatch.setattr(FusedDecoder, "_qk_norm", wrong_order)
    fused = KVCacheEngine(model, tokenizer).generate(prompts, n=1, sampling=sampling, seed=0)
    # Token 0 comes from the prefill (the model's forward); token 1 is the first fused step, on the same input.
    moved = [abs(float(f.logprobs[1] - p.logprobs[1])) for (f,), (p,) in zip(fused, plain, strict=True)]
    assert max(moved) > 1e-2


def test_engine_decodes_with_the_fused_step_only_where_it_may(llama, monkeypatch) -> None:
    model, tokenizer = llama
    steps = []
    original = FusedDecoder.step

    def counting_step(self, *args, **kwargs):
        steps.append(len(args[0]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FusedDecoder, "step", counting_step)
    prompt = _prompts(tokenizer)[:1]
    KVCacheEngine(model, tokenizer).generate(prompt, n=2, sampling=SamplingConfig(4, temperature=0.0), seed=0)
    assert steps == [2, 2, 2]  # prefill picks token 1; three decode steps of both rows
    steps.clear()
    KVCacheEngine(model, tokenizer, fused_decode=False).generate(prompt, 2, SamplingConfig(4, temperature=0.0), 0)
    handle = model.register_forward_pre_hook(lambda module, args: None)  # must see every forward: no fused step
    try:
        KVCacheEngine(model, tokenizer).generate(prompt, n=2, sampling=SamplingConfig(4, temperature=0.0), seed=0)
    finally:
        handle.remove()
    assert steps == []


def test_refusals_name_what_the_fused_step_would_skip(llama) -> None:
    model, _ = llama
    handle = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *args: None)
    try:
        assert "layers.1.mlp.up_proj has forward hooks" in fused_decode_refusal(model)
    finally:
        handle.remove()
    wrapped = copy.deepcopy(model)
    wrapped.model.layers[0].self_attn.q_proj = nn.Sequential(wrapped.model.layers[0].self_attn.q_proj)
    assert "modules other than" in fused_decode_refusal(wrapped) or "not a plain nn.Linear" in fused_decode_refusal(
        wrapped
    )
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert "is not one of" in fused_decode_refusal(lora)
    assert "not a plain nn.Linear" in fused_decode_refusal(lora.base_model.model)
    assert FusedDecoder.maybe(lora) is None


def test_qwen3_refusals(qwen3) -> None:
    model, _ = qwen3
    sliding = tiny_qwen3(model.config.vocab_size, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert "sliding-window" in fused_decode_refusal(sliding)
    handle = model.model.layers[1].self_attn.k_norm.register_forward_pre_hook(lambda *args: None)
    try:
        assert "layers.1.self_attn.k_norm has forward hooks" in fused_decode_refusal(model)
    finally:
        handle.remove()
    swapped = copy.deepcopy(model)
    swapped.model.layers[0].self_attn.q_norm = nn.LayerNorm(32)
    assert "q_norm is a LayerNorm" in fused_decode_refusal(swapped)


def test_a_refused_model_decodes_through_its_forward_and_says_so_once(qwen3, monkeypatch, caplog) -> None:
    model, tokenizer = qwen3
    monkeypatch.setattr(decode, "_fallbacks_logged", set())
    handle = model.register_forward_hook(lambda *args: None)
    try:
        with caplog.at_level(logging.INFO, logger=decode.__name__):
            for seed in range(2):
                KVCacheEngine(model, tokenizer).generate(_prompts(tokenizer)[:1], 2, SamplingConfig(3), seed)
    finally:
        handle.remove()
    (record,) = [r for r in caplog.records if r.name == decode.__name__]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "fused decode not used: model has forward hooks (torch or accelerate's), which a fused step would skip; "
        "decoding through the model's forward"
    )


def test_projection_fuses_linears_and_packs_for_one_row_count() -> None:
    g = torch.Generator().manual_seed(0)
    linears = [nn.Linear(16, 8, bias=True), nn.Linear(16, 4, bias=False)]
    for linear in linears:
        nn.init.normal_(linear.weight, generator=g)
    projection = _Projection(linears)
    projection.pack(5)
    if torch.backends.mkl.is_available():
        assert projection.packed is not None
    for rows in (5, 3):  # the packed row count, and another (compacted) one
        x = torch.randn(rows, 16, generator=g)
        with torch.no_grad():
            want = torch.cat([linear(x) for linear in linears], dim=-1)
        torch.testing.assert_close(projection(x), want)


def test_projection_packs_bf16_weights_under_autocast_with_the_same_numbers() -> None:
    """Under bf16 autocast the weight copy is bf16 and oneDNN's packed matmul runs it: the same numbers as the
    autocast ``F.linear`` that the model's own forward would run, at the packed row count and at another one."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        pytest.skip("oneDNN bf16 matmul is not available on this CPU")
    g = torch.Generator().manual_seed(0)
    linears = [nn.Linear(64, 32, bias=True), nn.Linear(64, 16, bias=False)]
    for linear in linears:
        nn.init.normal_(linear.weight, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projection = _Projection(linears)
        projection.pack(5)
        assert projection.kind == "onednn" and projection.packed is not None
        for rows in (5, 3):
            x = torch.randn(rows, 64, generator=g)
            with torch.no_grad():
                want = torch.cat([linear(x) for linear in linears], dim=-1)
            got = projection(x)
            assert got.dtype == want.dtype == torch.bfloat16
            torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fused_decode_runs_in_bfloat16(request, family: str) -> None:
    """Off fp32 (no MKL packing, norms as modules, rotary in float32) it follows the plain path to bf16 rounding."""
    model, tokenizer = request.getfixturevalue(family)
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    prompts = _prompts(tokenizer)[:2]
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0)
    fused = KVCacheEngine(model16, tokenizer).generate(prompts, n=2, sampling=sampling, seed=1)
    plain = KVCacheEngine(model16, tokenizer, fused_decode=False).generate(prompts, n=2, sampling=sampling, seed=1)
    for g1, g2 in zip(fused, plain, strict=True):
        for c1, c2 in zip(g1, g2, strict=True):
            assert c1.token_ids[0] == c2.token_ids[0]  # both from the same prefill
            assert torch.isfinite(c1.logprobs).all()
            # Compare while the traces agree (a bf16 rounding can move a sample across a CDF boundary).
            pairs = zip(c1.token_ids, c2.token_ids, strict=False)
            same = next((i for i, (a, b) in enumerate(pairs) if a != b), min(c1.num_tokens, c2.num_tokens))
            torch.testing.assert_close(c1.logprobs[:same], c2.logprobs[:same], atol=0.05, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fused_decode_under_bf16_autocast(request, family: str) -> None:
    """``precision: bf16-mixed`` (fp32 weights, bf16 autocast): the projections hold bf16 copies (cast once, not
    at every step) and the fused step follows the model-forward decode under the same autocast to bf16 rounding."""
    model, tokenizer = request.getfixturevalue(family)
    prompts = _prompts(tokenizer)[:2]
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0)  # >= 8: the projections are packed
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(p.dtype == torch.bfloat16 for p in FusedDecoder(model).projections[0][0].__dict__.values()
                   if isinstance(p, torch.Tensor))  # fmt: skip
        fused = KVCacheEngine(model, tokenizer).generate(prompts, n=2, sampling=sampling, seed=1)
        plain = KVCacheEngine(model, tokenizer, fused_decode=False).generate(prompts, n=2, sampling=sampling, seed=1)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for g1, g2 in zip(fused, plain, strict=True):
        for c1, c2 in zip(g1, g2, strict=True):
            assert c1.token_ids[0] == c2.token_ids[0]
            pairs = zip(c1.token_ids, c2.token_ids, strict=False)
            same = next((i for i, (a, b) in enumerate(pairs) if a != b), min(c1.num_tokens, c2.num_tokens))
            torch.testing.assert_close(c1.logprobs[:same], c2.logprobs[:same], atol=0.05, rtol=0)
