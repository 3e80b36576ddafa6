"""Shared by the engine tests: prompts, an independent reference for log-probabilities, EOS-forcing hooks, the
test vLLM settings."""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from spiral_lit.prompts import PromptConfig, PromptRenderer
from spiral_lit.rollout import Completion, VLLMConfig
from spiral_lit.tasks import ChainSumTask
from spiral_lit.training.batching import pack

VLLM_TEST_ENGINE = VLLMConfig(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=128 << 20, max_model_len=1024)
"""fp32, no torch.compile, a small KV cache: fast start-up and exact comparisons on a shared CPU."""


def chat_prompts(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Three chat-rendered search prompts and an aggregation prompt of ~300 tokens, all of different lengths.

    Different lengths make batched backends left-pad; the long prompt spans several KV blocks (prefix caching).
    """
    task = ChainSumTask()
    renderer = PromptRenderer(tokenizer, PromptConfig(), task.answer_instruction)
    problem = task.problem(0, "train")
    candidates = [problem.solution or "", *task.wrong_solutions(problem, 3, random.Random(0))]
    out = [
        renderer.search(ChainSumTask(n_terms=5).problem(0, "train")),
        renderer.search(ChainSumTask(n_terms=2, digits=1).problem(0, "train")),
        renderer.search(ChainSumTask(n_terms=3, digits=2).problem(1, "train")),
        renderer.aggregation_from_texts(problem, candidates, random.Random(0)),
    ]
    assert len({len(p) for p in out}) == len(out)
    return out


def set_noised_weights(
    model: torch.nn.Module, original: dict[str, torch.Tensor], seed: int, scale: float = 0.2
) -> None:
    """The original weights plus seeded noise, written in place (as an optimiser step would).

    Noise of std 0.2 (10x the initialisation's) makes greedy traces varied instead of one repeated token, and greedy
    near-ties (where backends that round differently may pick different tokens) rare.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(original[name] + scale * torch.randn(param.shape, generator=g))


def ids(groups: list[list[Completion]]) -> list[list[list[int]]]:
    """The token ids of every completion, grouped as returned."""
    return [[c.token_ids for c in group] for group in groups]


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every id that ends a trace: the generation config's EOS ids and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    return {i for i in [*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id] if i is not None}


def greedy_reference(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: list[int], max_new_tokens: int
) -> list[int]:
    """``model.generate``'s greedy completion of one unpadded prompt, cut after the first EOS."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(eos_ids(model, tokenizer)),
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt) :].tolist()
    end = next((i + 1 for i, t in enumerate(out) if t in eos_ids(model, tokenizer)), len(out))
    return out[:end]


def training_logprobs(model, prompts, completions, temperature: float) -> list[torch.Tensor]:
    """log_softmax(logits / T) at each completion token, from one right-padded forward pass (as the trainer does).

    Written out here rather than calling ``token_logprobs``, so the reference does not share code with what it checks.
    """
    batch = pack(prompts, completions, pad_id=0)
    with torch.no_grad():
        logits_BTV = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits[:, :-1]
    logp_BT = torch.log_softmax(logits_BTV.float() / temperature, dim=-1)
    logp_BT = logp_BT.gather(-1, batch.targets_BT1.unsqueeze(-1)).squeeze(-1)
    return [logp_BT[i][batch.completion_mask_BT1[i]] for i in range(len(prompts))]


class EOSOnStep:
    """lm_head forward hook: EOS is forbidden everywhere except row ``row`` at forward call ``step`` (forced)."""

    def __init__(self, eos_id: int, row: int, step: int) -> None:
        self.eos_id, self.row, self.step, self.calls = eos_id, row, step, 0

    def __call__(self, module, inputs, logits_BTV: torch.Tensor) -> torch.Tensor:
        self.calls += 1  # call 1 is the prefill, which picks the first new token
        logits_BTV = logits_BTV.clone()
        logits_BTV[:, -1, self.eos_id] = -1e4
        if self.calls == self.step:
            logits_BTV[self.row, -1, self.eos_id] = 1e4
        return logits_BTV


class EOSBias:
    """lm_head forward hook: adds ``bias`` to the EOS logit of every row, so sampled traces end at varied steps."""

    def __init__(self, eos_id: int, bias: float) -> None:
        self.eos_id, self.bias = eos_id, bias

    def __call__(self, module, inputs, logits_BTV: torch.Tensor) -> torch.Tensor:
        logits_BTV = logits_BTV.clone()
        logits_BTV[..., self.eos_id] += self.bias
        return logits_BTV
