"""Our own rollout engine: a decode loop over a Hugging Face causal LM's forward (issue 5).

What it does that ``model.generate`` (:mod:`spiral_lit.rollout.hf`) does not:

- **Shared prefill.** Each distinct prompt is prefilled once (distinct prompts batched,
  left-padded); its KV rows are then copied to its ``n`` samples. An aggregation prompt of
  ~400 tokens with 4 samples costs one prefill, not four.
- **A KV cache that grows in blocks.** Decode writes each step's keys/values in place into
  buffers with spare slots (``cache_block`` at a time) instead of ``torch.cat``-ing the whole
  cache every step, which on long prompts copied more memory than the attention read.
- **Batch compaction.** Every ``compact_every`` steps, rows that finished (EOS or a stop
  string) are dropped from the cache, the mask and the inputs, and the left padding that
  no remaining row needs is cut off.
- **Masks built once.** The decode mask is a slice of one additive ``[rows, slots]`` buffer
  and is passed in 4D, so no per-step mask construction happens (sdpa and eager attention).

Sampling (:mod:`spiral_lit.rollout.sampling`) is inverse-CDF with one uniform number per
(prompt index, sample index, step), drawn up front from a ``torch.Generator`` seeded with
``seed``; the global RNG is never touched. The same request and seed therefore give the
same rollouts, and a row's draws do not depend on which rows share its batch: neither
``max_batch_size`` chunking nor compaction changes which uniform a row uses. What can
still couple rows is floating point: a row's logits are computed in a batch whose size
and padding depend on the others, and kernels may round differently per shape, so a
token sitting on a CDF boundary (or a greedy near-tie) can rarely flip.

Requires a full-attention decoder (Llama, Qwen2, Mistral without sliding window) whose
forward takes ``position_ids`` and a 4D additive mask; sliding-window caches are refused.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from spiral_lit.rollout.base import Completion, FinishReason, SamplingConfig
from spiral_lit.rollout.sampling import sample_tokens


class _BlockLayer(DynamicLayer):
    """One layer's keys/values ``[rows, heads, slots, dim]`` with spare slots; ``length`` slots are in use."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int, block: int) -> None:
        super().__init__()
        self.keys, self.values, self.length, self.block = keys, values, length, block
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.keys.shape[-2]:
            self.reshape(None, 0, end + self.block)
        self.keys[:, :, self.length : end] = key_states
        self.values[:, :, self.length : end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def reshape(self, rows_R: torch.Tensor | None, start: int, capacity: int) -> None:
        """Keep rows ``rows_R`` (all if None) and slots ``start:length`` in new buffers of ``capacity`` slots."""
        kept = self.length - start
        for name in ("keys", "values"):
            old = getattr(self, name)[:, :, start : self.length]
            if rows_R is not None:
                old = old.index_select(0, rows_R)
            new = old.new_empty((old.shape[0], old.shape[1], capacity, old.shape[3]))
            new[:, :, :kept] = old
            setattr(self, name, new)
        self.length = kept


class KVCacheEngine:
    """Rollouts from the model's own forward with a shared-prefill, compacted KV cache (module docstring)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_batch_size: int = 256,
        compact_every: int | None = 4,
        cache_block: int = 256,
    ) -> None:
        """
        Args:
            model: A Hugging Face causal LM (full attention, sdpa or eager).
            tokenizer: Its tokenizer (pad token for left padding, EOS, decoding).
            max_batch_size: Most sample rows decoded together; larger requests run in chunks.
            compact_every: Drop finished rows every this many steps; None keeps them to the end.
            cache_block: Spare KV slots added when the cache is full (amortises the copy).
        """
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.compact_every, self.cache_block = max_batch_size, compact_every, cache_block
        eos = model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.eos_ids = sorted({i for i in [*eos_ids, tokenizer.eos_token_id] if i is not None})
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values to cache (the old name warns until 5.40).
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._last_logit_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig, seed: int) -> list[list[Completion]]:
        """``n`` completions per prompt, grouped per prompt in input order."""
        generator = torch.Generator().manual_seed(seed)
        uniforms_RT = torch.rand((len(prompts) * n, sampling.max_new_tokens), generator=generator)
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
            with torch.no_grad():
                for start in range(0, len(plan), self.max_batch_size):
                    chunk = plan[start : start + self.max_batch_size]
                    rows = [row for _, row in chunk]
                    for row, completion in zip(rows, self._generate_chunk(chunk, uniforms_RT[rows], sampling)):
                        out[row] = completion
        finally:
            self.model.train(was_training)
        return [out[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _forward(self, cache: DynamicCache, **inputs: torch.Tensor) -> torch.Tensor:
        """Last-position logits ``[B, V]`` of one forward that appends to ``cache``."""
        inputs[self._cache_kwarg] = cache
        return self.model(**inputs, use_cache=True, **self._last_logit_kwargs).logits[:, -1]

    def _prefill(self, prompts: list[tuple[int, ...]]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """One left-padded forward over distinct prompts: (cache, valid_PW mask, last logits_PV)."""
        device = self.model.device
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id or 0
        ids_PW = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
        valid_PW = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=device)
        cache = DynamicCache(config=self.model.config)
        if any(cache.is_sliding):
            raise NotImplementedError("KVCacheEngine needs full attention in every layer; use rollout backend 'hf'")
        position_ids_PW = (valid_PW.long().cumsum(-1) - 1).clamp(min=0)
        logits_PV = self._forward(
            cache, input_ids=ids_PW, attention_mask=valid_PW.long(), position_ids=position_ids_PW
        )
        return cache, valid_PW, logits_PV

    def _generate_chunk(
        self, chunk: list[tuple[tuple[int, ...], int]], uniforms_RT: torch.Tensor, sampling: SamplingConfig
    ) -> list[Completion]:
        device, T = self.model.device, sampling.max_new_tokens
        prompts = list(dict.fromkeys(prompt for prompt, _ in chunk))
        cache, valid_PW, logits_PV = self._prefill(prompts)
        # Every sample row starts from its prompt's prefilled KV rows: copy, don't recompute.
        index = {prompt: i for i, prompt in enumerate(prompts)}
        source_R = torch.tensor([index[prompt] for prompt, _ in chunk], device=device)
        width, block = valid_PW.shape[1], min(self.cache_block, T)
        cache.layers = [self._expand(layer, source_R, width, block) for layer in cache.layers]
        valid_RW = valid_PW.index_select(0, source_R)
        mask_RS = torch.zeros((len(chunk), width + T), device=device, dtype=self.model.dtype)
        mask_RS[:, :width].masked_fill_(~valid_RW, torch.finfo(mask_RS.dtype).min)
        pad_R = (~valid_RW).sum(-1)
        next_pos_R = valid_RW.sum(-1)
        uniforms_RT = uniforms_RT.to(device)
        tokens_RT = torch.zeros((len(chunk), T), dtype=torch.long, device=device)
        logprobs_RT = torch.zeros((len(chunk), T), dtype=torch.float32, device=device)
        lengths = [T] * len(chunk)
        reasons: list[FinishReason] = ["length"] * len(chunk)
        eos = torch.tensor(self.eos_ids, device=device, dtype=torch.long)

        batch_R = torch.arange(len(chunk), device=device)  # chunk rows still in the decode batch
        running_R = torch.ones(len(chunk), dtype=torch.bool, device=device)
        logits_BV = logits_PV.index_select(0, source_R)
        for step in range(T):
            if step > 0:
                slots = cache.get_seq_length() + 1
                logits_BV = self._forward(
                    cache,
                    input_ids=tokens_B[:, None],
                    attention_mask=mask_RS[:, None, None, :slots],
                    position_ids=next_pos_R[:, None],
                )
                next_pos_R = next_pos_R + 1
            tokens_B, logp_B = sample_tokens(
                logits_BV, uniforms_RT[batch_R, step], sampling.temperature, sampling.top_p
            )
            tokens_RT[batch_R, step], logprobs_RT[batch_R, step] = tokens_B, logp_B
            stopped_B = running_R & torch.isin(tokens_B, eos)
            if sampling.stop_strings:
                stopped_B |= running_R & self._stop_string_hits(tokens_RT, batch_R, step, sampling.stop_strings)
            for row in batch_R[stopped_B].tolist():
                lengths[row], reasons[row] = step + 1, "stop"
            running_R = running_R & ~stopped_B
            if not bool(running_R.any()):
                break
            if self.compact_every and step % self.compact_every == 0 and not bool(running_R.all()):
                keep_B = running_R.nonzero().squeeze(-1)
                start = int(pad_R[keep_B].min())
                for layer in cache.layers:
                    layer.reshape(keep_B, start, layer.keys.shape[-2] - start)
                mask_RS = mask_RS.index_select(0, keep_B)[:, start:]
                pad_R, next_pos_R = pad_R[keep_B] - start, next_pos_R[keep_B]
                batch_R, tokens_B, running_R = batch_R[keep_B], tokens_B[keep_B], running_R[keep_B]
        return self._completions(tokens_RT, logprobs_RT, lengths, reasons)

    def _expand(self, layer: DynamicLayer, source_R: torch.Tensor, width: int, block: int) -> _BlockLayer:
        """Prefilled ``[P, H, width, D]`` keys/values -> ``[R, H, width + block, D]`` sample rows."""
        grown = _BlockLayer(layer.keys, layer.values, width, block)
        grown.reshape(source_R, 0, width + block)
        return grown

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
        logprobs_RT = logprobs_RT.cpu()
        return [
            Completion(token_ids=i, logprobs=logprobs_RT[r, : len(i)].clone(), finish_reason=reason, text=text)
            for r, (i, reason, text) in enumerate(zip(ids, reasons, texts, strict=True))
        ]
