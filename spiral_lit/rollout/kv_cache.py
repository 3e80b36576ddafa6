"""Our own rollout engine: a decode loop over a Hugging Face causal LM's forward (docs/algorithm.md §8.1).

What it does that ``model.generate`` (:mod:`spiral_lit.rollout.hf`) does not:

- **Shared prefill.** Each distinct prompt is prefilled once (distinct prompts batched,
  left-padded) and its KV cache serves all of its ``n`` samples: an aggregation prompt of
  ~400 tokens with 4 samples costs one prefill, not four.
- **Shared prompt KV in decode.** The samples of a prompt are not given copies of its KV
  rows; attention reads the prompt's keys once for all of them and each sample's own
  generated keys separately (:mod:`spiral_lit.fastpath.attention`).
- **A cache that grows in blocks.** Generated keys/values are written in place into
  buffers with ``cache_block`` spare slots instead of ``torch.cat``-ing the whole cache
  every step, which on long prompts copied more memory than attention read.
- **Batch compaction.** Every ``compact_every`` steps, rows that finished (EOS or a stop
  string) leave the cache and the inputs; prompts no row reads any more, and left padding
  no remaining prompt needs, are dropped too.
- **A fused decode step** for Llama/Qwen2/Mistral models (:mod:`spiral_lit.fastpath.decode`):
  Q/K/V and gate/up each one matmul, MKL-packed weights on CPU, no transformers plumbing per
  layer. Other models (or ``fused_decode=False``) decode through the model's ``forward``.

Sampling (:mod:`spiral_lit.rollout.sampling`) is inverse-CDF with one uniform number per
(prompt index, sample index, step), drawn up front from a ``torch.Generator`` seeded with
``seed`` (or, given one seed per prompt, from each prompt's own generator, so a prompt's draws
do not depend on the rest of the request); the global RNG is never touched. The same request and seed give the same
rollouts, and a row's draws do not depend on which rows share its batch: neither
``max_batch_size`` chunking nor compaction changes which uniform a row uses. What can still
couple rows is floating point: a row's logits come from a batch whose size and padding
depend on the other rows, kernels may round differently per shape, so a token sitting on a
CDF boundary (or a greedy near-tie) can in rare cases flip.

Requires a full-attention decoder (Llama, Qwen2, Mistral without sliding window) whose
attention goes through transformers' ``AttentionInterface``; sliding-window caches are refused.
Ranks decode independently (each stops when its own rows are done), so a model sharded
with FSDP, whose every forward is collective, is refused too: use backend ``hf`` there
(``model.generate`` keeps sharded ranks in lockstep).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from spiral_lit.fastpath.attention import SHARED_PREFIX_ATTENTION, SharedPrefix
from spiral_lit.fastpath.decode import FusedDecoder
from spiral_lit.rollout.base import Completion, FinishReason, SamplingConfig, Seed
from spiral_lit.rollout.sampling import draw_uniforms, sample_tokens


class _BlockLayer(DynamicLayer):
    """One layer's generated keys/values ``[rows, kv_heads, slots, D]``; ``length`` slots are in use."""

    keys: torch.Tensor
    values: torch.Tensor

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, block: int) -> None:
        super().__init__()
        self.keys, self.values, self.length, self.block = keys, values, 0, block
        self.device, self.is_initialized = keys.device, True

    @classmethod
    def empty(cls, rows: int, keys_like: torch.Tensor, values_like: torch.Tensor, block: int) -> _BlockLayer:
        """No tokens yet, ``block`` slots for ``rows`` rows, heads/dim/dtype of the given ``[P, H, W, D]`` tensors."""
        _, heads, _, dim = keys_like.shape
        keys = keys_like.new_empty((rows, heads, block, dim))
        return cls(keys, values_like.new_empty((rows, values_like.shape[1], block, values_like.shape[3])), block)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.keys.shape[-2]:
            self.reshape(None, end + self.block)
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def reshape(self, rows_R: torch.Tensor | None, capacity: int) -> None:
        """Keep rows ``rows_R`` (all if None) in new buffers of ``capacity`` slots."""
        for name in ("keys", "values"):
            old = getattr(self, name)[:, :, : self.length]
            if rows_R is not None:
                old = old.index_select(0, rows_R)
            new = old.new_empty((old.shape[0], old.shape[1], capacity, old.shape[3]))
            new[:, :, : self.length] = old
            setattr(self, name, new)


def _is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP (1 or 2) manages the model, so that every forward is a collective."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel) or any(isinstance(m, FSDPModule) for m in model.modules())


@dataclass
class _Batch:
    """The sample rows decoded together: the prompt KV they share, their own KV, where they stand."""

    prefix: SharedPrefix
    cache: DynamicCache
    """Generated tokens' keys/values, one ``_BlockLayer`` per model layer."""
    rows_B: torch.Tensor
    """Chunk row of each batch row."""
    running_B: torch.Tensor
    """False once a row has finished (it stays until the next compaction)."""
    next_pos_B: torch.Tensor
    """Position id of each row's next input token."""

    def compact(self, tokens_B: torch.Tensor) -> torch.Tensor:
        """Drop finished rows from the KV caches and the row state; returns the kept rows' ``tokens_B``."""
        keep_B = self.running_B.nonzero().squeeze(-1)
        self.prefix.keep(keep_B)
        for layer in cast("list[_BlockLayer]", self.cache.layers):
            layer.reshape(keep_B, layer.keys.shape[-2])
        self.rows_B, self.running_B, self.next_pos_B = (
            t[keep_B] for t in (self.rows_B, self.running_B, self.next_pos_B)
        )
        return tokens_B[keep_B]


@contextmanager
def _attention_implementation(model: PreTrainedModel, name: str) -> Iterator[None]:
    """Select a registered attention implementation for the duration of a block."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = previous


class KVCacheEngine:
    """Rollouts from the model's own forward with a shared-prefill, compacted KV cache (module docstring)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_batch_size: int = 256,
        compact_every: int | None = 4,
        cache_block: int = 256,
        fused_decode: bool = True,
    ) -> None:
        """
        Args:
            model: A Hugging Face causal LM with full attention.
            tokenizer: Its tokenizer (pad token for left padding, EOS, decoding).
            max_batch_size: Most sample rows decoded together; larger requests run in chunks.
            compact_every: Drop finished rows every this many steps; None keeps them to the end.
            cache_block: Spare KV slots added when the cache of generated tokens is full.
            fused_decode: Decode Llama/Qwen2/Qwen3/Mistral models with :class:`FusedDecoder` (fused projections,
                no transformers plumbing); other models (logged once), or False, use the model's forward.
        """
        self.model, self.tokenizer = model, tokenizer
        self.fused_decode = fused_decode
        self.max_batch_size, self.compact_every, self.cache_block = max_batch_size, compact_every, cache_block
        eos = model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.eos_ids = sorted({i for i in [*eos_ids, tokenizer.eos_token_id] if i is not None})
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values to cache (the old name warns until 5.40).
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._last_logit_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def generate(
        self, prompts: list[list[int]], n: int, sampling: SamplingConfig, seed: Seed
    ) -> list[list[Completion]]:
        """``n`` completions per prompt, grouped per prompt in input order; ``seed``: one, or one per prompt."""
        if _is_sharded(self.model):
            raise NotImplementedError("KVCacheEngine cannot decode an FSDP-sharded model; use rollout backend 'hf'")
        uniforms_RT = draw_uniforms(len(prompts), n, sampling.max_new_tokens, seed)
        # Output rows (prompt i, sample j) -> row i * n + j, grouped by distinct prompt, longest prompt first,
        # so a chunk holds whole prompts where possible and prompts of similar length.
        distinct: dict[tuple[int, ...], list[int]] = {}
        for i, prompt in enumerate(prompts):
            distinct.setdefault(tuple(prompt), []).extend(range(i * n, (i + 1) * n))
        plan = [(prompt, row) for prompt, rows in sorted(distinct.items(), key=lambda kv: -len(kv[0])) for row in rows]
        out: list[Completion] = [None] * len(plan)  # type: ignore[list-item]
        was_training = self.model.training
        self.model.eval()
        try:
            # Inference mode, not just no_grad: it skips the autograd view/version bookkeeping of the decode
            # loop's many small ops (6-9% of a decode step on 2 CPU threads). Returned tensors are
            # made outside it (_completions), so callers can use them in autograd.
            with torch.inference_mode():
                # Fused weights are copied per call, so they are the weights being trained right now.
                decoder = FusedDecoder.maybe(self.model) if self.fused_decode else None
                for start in range(0, len(plan), self.max_batch_size):
                    chunk = plan[start : start + self.max_batch_size]
                    rows = [row for _, row in chunk]
                    completions = self._generate_chunk(chunk, uniforms_RT[rows], sampling, decoder)
                    for row, completion in zip(rows, completions, strict=True):
                        out[row] = completion
        finally:
            self.model.train(was_training)
        return [out[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _forward(self, cache: DynamicCache, **inputs) -> torch.Tensor:
        """Last-position logits ``[B, V]`` of one forward that appends to ``cache``."""
        inputs[self._cache_kwarg] = cache
        return self.model(**inputs, use_cache=True, **self._last_logit_kwargs).logits[:, -1]

    def _prefill(self, prompts: list[tuple[int, ...]]) -> tuple[SharedPrefix, torch.Tensor, torch.Tensor]:
        """One left-padded forward over the distinct prompts: (their KV, last logits ``[P, V]``, lengths ``[P]``)."""
        device = self.model.device
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id or 0
        ids_PW = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
        valid_PW = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=device)
        cache = DynamicCache(config=self.model.config)
        if any(cache.is_sliding):
            raise NotImplementedError("KVCacheEngine needs full attention in every layer; use rollout backend 'hf'")
        position_ids_PW = (valid_PW.long().cumsum(-1) - 1).clamp(min=0)
        logits_PV = self._forward(cache, input_ids=ids_PW, attention_mask=valid_PW.long(), position_ids=position_ids_PW)
        mask_PW = torch.zeros(valid_PW.shape, device=device, dtype=self.model.dtype)
        mask_PW.masked_fill_(~valid_PW, torch.finfo(mask_PW.dtype).min)
        # Full attention in every layer (checked above): DynamicLayers, all filled by the prefill forward.
        layers = cast("list[DynamicLayer]", cache.layers)
        keys = [cast(torch.Tensor, layer.keys) for layer in layers]
        prefix = SharedPrefix(keys, [cast(torch.Tensor, layer.values) for layer in layers], mask_PW)
        return prefix, logits_PV, valid_PW.sum(-1)

    def _start(self, chunk: list[tuple[tuple[int, ...], int]], block: int) -> tuple[_Batch, torch.Tensor]:
        """Prefill the chunk's distinct prompts; every sample row reads its prompt's KV (no copy)."""
        prompts = list(dict.fromkeys(prompt for prompt, _ in chunk))
        prefix, logits_PV, prompt_len_P = self._prefill(prompts)
        index = {prompt: i for i, prompt in enumerate(prompts)}
        source_R = torch.tensor([index[prompt] for prompt, _ in chunk], device=self.model.device)
        prefix.set_rows(source_R)
        cache = DynamicCache()  # generated tokens only; the prompt part lives in ``prefix``
        R = len(chunk)
        cache.layers = [_BlockLayer.empty(R, k, v, block) for k, v in zip(prefix.keys, prefix.values, strict=True)]
        rows_R = torch.arange(R, device=source_R.device)
        batch = _Batch(prefix, cache, rows_R, torch.ones_like(rows_R, dtype=torch.bool), prompt_len_P[source_R])
        return batch, logits_PV[source_R]

    def _generate_chunk(
        self,
        chunk: list[tuple[tuple[int, ...], int]],
        uniforms_RT: torch.Tensor,
        sampling: SamplingConfig,
        decoder: FusedDecoder | None,
    ) -> list[Completion]:
        device, R, T = self.model.device, len(chunk), sampling.max_new_tokens
        batch, logits_BV = self._start(chunk, min(self.cache_block, T))
        if decoder is not None:
            decoder.interleave_prompt_keys(batch.prefix)
            if T >= 8:
                # Packing costs about two copies of the weights: worth it from a few steps on. Once per
                # chunk: after a compaction the smaller batch runs unpacked.
                decoder.pack(R)
        tokens_RT = torch.zeros((R, T), dtype=torch.long, device=device)
        logprobs_RT = torch.zeros((R, T), dtype=torch.float32, device=device)
        lengths = [T] * R
        reasons: list[FinishReason] = ["length"] * R
        eos = torch.tensor(self.eos_ids, device=device, dtype=torch.long)
        uniforms_RT = uniforms_RT.to(device)
        with _attention_implementation(self.model, SHARED_PREFIX_ATTENTION):
            for step in range(T):
                rows_B = batch.rows_B
                tokens_B, logp_B = sample_tokens(
                    logits_BV, uniforms_RT[rows_B, step], sampling.temperature, sampling.top_p
                )
                tokens_RT[rows_B, step], logprobs_RT[rows_B, step] = tokens_B, logp_B
                stopped_B = batch.running_B & torch.isin(tokens_B, eos)
                if sampling.stop_strings:
                    stopped_B |= batch.running_B & self._stop_string_hits(
                        tokens_RT, rows_B, step, sampling.stop_strings
                    )
                for row in rows_B[stopped_B].tolist():
                    lengths[row], reasons[row] = step + 1, "stop"
                batch.running_B = batch.running_B & ~stopped_B
                if step + 1 == T or not bool(batch.running_B.any()):
                    break
                if self.compact_every and step % self.compact_every == 0 and not bool(batch.running_B.all()):
                    tokens_B = batch.compact(tokens_B)
                if decoder is not None:
                    logits_BV = decoder.step(tokens_B, batch.next_pos_B, batch.prefix, batch.cache.layers)
                else:
                    logits_BV = self._forward(
                        batch.cache,
                        input_ids=tokens_B[:, None],
                        position_ids=batch.next_pos_B[:, None],
                        attention_mask=batch.prefix.mask_PW[:, None, None, :],  # 4D: transformers builds no mask
                        shared_prefix=batch.prefix,
                    )
                batch.next_pos_B = batch.next_pos_B + 1
        return self._completions(tokens_RT, logprobs_RT, lengths, reasons)

    def _stop_string_hits(
        self, tokens_RT: torch.Tensor, batch_R: torch.Tensor, step: int, stop_strings: list[str]
    ) -> torch.Tensor:
        """[B] True where a stop string ends in this step's token (a match must overlap the newest token)."""
        # Every token is at least one byte, so a match ending in the newest token lies in this many tokens.
        window = max(len(s.encode()) for s in stop_strings) + 1
        tails = self.tokenizer.batch_decode(tokens_RT[batch_R, max(0, step + 1 - window) : step + 1].tolist())
        return torch.tensor([any(s in tail for s in stop_strings) for tail in tails], device=tokens_RT.device)

    def _completions(
        self, tokens_RT: torch.Tensor, logprobs_RT: torch.Tensor, lengths: list[int], reasons: list[FinishReason]
    ) -> list[Completion]:
        ids = [row[:length] for row, length in zip(tokens_RT.tolist(), lengths, strict=True)]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        with torch.inference_mode(False):  # clones of inference tensors made here are ordinary tensors
            logprobs_RT = logprobs_RT.cpu()
            return [
                Completion(token_ids=i, logprobs=logprobs_RT[r, : len(i)].clone(), finish_reason=reason, text=text)
                for r, (i, reason, text) in enumerate(zip(ids, reasons, texts, strict=True))
            ]
