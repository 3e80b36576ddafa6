"""The reference rollout backend: Hugging Face ``model.generate`` with the KV cache.

Sampler log-probabilities are recorded on the fly by a logits processor that sees the
raw logits first and keeps only one ``[batch, vocab]`` distribution at a time (storing
every step's logits would need batch x steps x vocab floats: ~150 GB for 64 traces of
4096 tokens over Qwen's vocabulary). Temperature and top-p are applied after it, so the
recorded value is log softmax(logits / T), the same quantity the trainer recomputes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from spiral_lit.rollout.base import Completion, FinishReason, SamplingConfig, Seed, check_seeds
from spiral_lit.rollout.fsdp import synced_generate

if TYPE_CHECKING:
    from transformers import GenerationMixin


class _LogprobRecorder(LogitsProcessor):
    """Records log p(token) of each sampled token under softmax(logits / T)."""

    def __init__(self, temperature: float, prompt_len: int) -> None:
        self.temperature = temperature if temperature > 0 else 1.0
        self.prompt_len = prompt_len
        self.last_logprobs_BV: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def _record(self, input_ids: torch.Tensor) -> None:
        if self.last_logprobs_BV is not None and input_ids.shape[1] > self.prompt_len + len(self.steps):
            self.steps.append(self.last_logprobs_BV.gather(1, input_ids[:, -1:]).squeeze(1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._record(input_ids)
        self.last_logprobs_BV = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[B, generated] log-probabilities once generation has returned its sequences."""
        self._record(sequences)
        if not self.steps:
            return sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float32)
        return torch.stack(self.steps, dim=1)


class HFGenerateEngine:
    """Rollouts through ``model.generate``; every prompt's ``n`` samples are separate rows."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_batch_size: int = 256) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        eos = model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in [*eos_ids, tokenizer.eos_token_id] if i is not None}

    def _generation_config(self, sampling: SamplingConfig) -> GenerationConfig:
        # A fresh config so a checkpoint's own defaults (Qwen ships top_k=20, T=0.7) never leak in;
        # temperature/top-p are applied by our processors after the log-prob recorder.
        return GenerationConfig(
            do_sample=sampling.temperature > 0,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.tokenizer.pad_token_id,
            top_k=0,
            temperature=1.0,
            top_p=1.0,
            stop_strings=sampling.stop_strings or None,
        )

    @torch.no_grad()
    def _generate_chunk(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.model.device)
        attention_mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.model.device
        )
        recorder = _LogprobRecorder(sampling.temperature, width)
        processors: list[LogitsProcessor] = [recorder]
        if sampling.temperature > 0:
            if sampling.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_p < 1.0:
                processors.append(TopPLogitsWarper(sampling.top_p))
        # transformers 5's PreTrainedModel is no GenerationMixin; every causal LM class is one.
        sequences = cast("GenerationMixin", self.model).generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=self._generation_config(sampling),
            logits_processor=LogitsProcessorList(processors),
            tokenizer=self.tokenizer if sampling.stop_strings else None,
            synced_gpus=synced_generate(self.model),
        )
        logprobs_BT = recorder.finish(sequences).cpu()
        generated_BT = sequences[:, width:].cpu()
        return [self._completion(row.tolist(), lp, sampling) for row, lp in zip(generated_BT, logprobs_BT, strict=True)]

    def _completion(self, ids: list[int], logprobs: torch.Tensor, sampling: SamplingConfig) -> Completion:
        end = next((i + 1 for i, t in enumerate(ids) if t in self.eos_ids), None)
        reason: FinishReason = "stop" if end is not None else "length"
        ids = ids[: end if end is not None else sampling.max_new_tokens]
        text = cast(str, self.tokenizer.decode(ids, skip_special_tokens=True))  # one sequence in, one str out
        if reason == "length" and sampling.stop_strings and any(text.endswith(s) for s in sampling.stop_strings):
            reason = "stop"
        return Completion(token_ids=ids, logprobs=logprobs[: len(ids)].clone(), finish_reason=reason, text=text)

    def generate(
        self, prompts: list[list[int]], n: int, sampling: SamplingConfig, seed: Seed
    ) -> list[list[Completion]]:
        """``n`` completions per prompt, grouped per prompt in input order.

        ``model.generate`` draws from the global RNG, so one seed per prompt means one ``generate``
        call per prompt (seeded with it): slower, but a prompt's samples then depend on nothing else.
        """
        check_seeds(prompts, seed)
        # (prompt indices, seed) per group of rows sampled after one manual_seed.
        groups = [(range(len(prompts)), seed)] if isinstance(seed, int) else [([i], s) for i, s in enumerate(seed)]
        was_training = self.model.training
        self.model.eval()
        out: list[Completion] = []
        try:
            cuda = [self.model.device] if self.model.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                for indices, group_seed in groups:
                    torch.manual_seed(group_seed)
                    rows = [prompts[i] for i in indices for _ in range(n)]
                    for start in range(0, len(rows), self.max_batch_size):
                        out.extend(self._generate_chunk(rows[start : start + self.max_batch_size], sampling))
        finally:
            self.model.train(was_training)
        return [out[i * n : (i + 1) * n] for i in range(len(prompts))]
