"""Log-probs of completions that share prompts, with each distinct prompt encoded once.

Why: a rollout batch repeats every prompt (``n_search`` samples per problem, ``n_agg`` per aggregation set, and an
aggregation prompt is several times longer than its completions), and the plain update runs every row as
``prompt + completion``, so each prompt goes through the model ``n`` times, forward and backward.

How: the distinct prompts without their last token (the *prefix*, right-padded) run once through the model, which
writes each layer's keys/values into a transformers ``Cache``. Then ``[last prompt token] + completion[:-1]`` (the
*suffix*, right-padded) runs with a second ``Cache`` whose layers hand attention ``[the prefix keys/values of each
row's prompt, gathered by index_select | the suffix's own]``, with position ids that continue each row's prompt and
a 2D attention mask over ``[prefix | suffix]``. The gather is out of place, so the gradients of all samples of a
prompt flow back into its one prefix pass and add up. The logits at suffix position t predict completion token t,
as the full forward's logits at ``len(prompt) - 1 + t`` do; tests/training/test_prefix_forward.py compares log-probs and
gradients of both. (With dropout on, the samples of a prompt share one dropout draw over the prompt.)

Both cache layers are safe to replay, so the layers can stay activation-checkpointed (the paper configs use
``policy.gradient_checkpointing``): the prefix layer replaces rather than appends its keys/values, the suffix layer
stores nothing, and the gather runs inside the checkpointed layer (recomputed in backward, not kept). transformers
drops the cache of a checkpointed layer unless the layer says it can keep it (``_can_checkpoint_with_cache``),
which :func:`shared_prefix_logits` sets on the model's checkpointed layers for the length of its call only.

Supported: Hugging Face causal LMs with full attention in every layer (Llama, Qwen2/3, Mistral without a sliding
window), ``eager`` or ``sdpa`` attention, optionally wrapped in peft (LoRA; not prompt learning), with or without
non-reentrant activation checkpointing. :func:`shared_prefix_support` names what else is refused (FSDP, sliding
windows, reentrant checkpointing, ...); the updater then uses the full forward (:mod:`spiral_lit.training.forward`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

SUPPORTED_ATTENTION = ("eager", "sdpa")
"""Attention implementations the shared-prefix forward is tested with (2D padding mask over cache + suffix)."""


@dataclass(frozen=True)
class CacheForward:
    """How this model's forward takes a KV cache: transformers 5 renamed ``past_key_values`` to ``cache``."""

    cache_kwarg: str
    last_logit_kwargs: dict[str, int]
    """``{"logits_to_keep": 1}`` where supported: the prefix pass needs no logits, only its keys/values."""


@dataclass
class SharedPrefixBatch:
    """Rows grouped by prompt: distinct prefixes once, one suffix per row.

    ``targets_BT1``, ``completion_mask_BT1`` and ``values_BT1`` have the names and meaning of
    :class:`spiral_lit.training.batching.PackedBatch`'s (aligned with the logits), so the loss code reads either; here
    the
    width is the suffix's, S = longest completion, and position t is completion token t.
    """

    prefix_ids_PL: torch.Tensor
    """Distinct prompts without their last token, right-padded: ``[P, L]``, L = longest prompt - 1 (may be 0)."""
    prefix_mask_PL: torch.Tensor
    """True = a prompt token (bool)."""
    source_B: torch.Tensor
    """Index into the P distinct prompts for each row (long)."""
    suffix_ids_BS: torch.Tensor
    """``[last prompt token] + completion[:-1]``, right-padded."""
    suffix_mask_BS: torch.Tensor
    """True = a real suffix token (bool); position 0 always is."""
    suffix_positions_BS: torch.Tensor
    """Position ids: ``len(prompt) - 1 + t``."""
    targets_BT1: torch.Tensor
    """Completion tokens, right-padded: what logit t predicts."""
    completion_mask_BT1: torch.Tensor
    """True where t < the row's completion length."""
    values_BT1: dict[str, torch.Tensor]
    """Per-completion-token values (e.g. old log-probs) in the target layout."""
    rows: list[int]
    """Indices of these sequences in the caller's list."""

    def to(self, device: torch.device) -> SharedPrefixBatch:
        return SharedPrefixBatch(
            self.prefix_ids_PL.to(device),
            self.prefix_mask_PL.to(device),
            self.source_B.to(device),
            self.suffix_ids_BS.to(device),
            self.suffix_mask_BS.to(device),
            self.suffix_positions_BS.to(device),
            self.targets_BT1.to(device),
            self.completion_mask_BT1.to(device),
            {k: v.to(device) for k, v in self.values_BT1.items()},
            self.rows,
        )


def pack_shared_prefix(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    pad_id: int,
    token_values: dict[str, Sequence[torch.Tensor]] | None = None,
    rows: list[int] | None = None,
) -> SharedPrefixBatch:
    """The shared-prefix layout of ``prompt + completion`` rows; ``token_values[k][i]``: one value per completion
    token, as :func:`spiral_lit.training.batching.pack` takes them."""
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"pack_shared_prefix: prompt of row {empty[0]} is empty; every prompt needs at least one "
                         "token (its last one starts the suffix)")  # fmt: skip
    index: dict[tuple[int, ...], int] = {}
    source = [index.setdefault(tuple(p), len(index)) for p in prompts]
    distinct: list[Sequence[int]] = list(index)
    n, width_l = len(prompts), max(len(p) for p in distinct) - 1
    prefix_ids = torch.full((len(distinct), width_l), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros((len(distinct), width_l), dtype=torch.bool)
    for i, p in enumerate(distinct):
        prefix_ids[i, : len(p) - 1] = torch.tensor(p[:-1], dtype=torch.long)
        prefix_mask[i, : len(p) - 1] = True
    width_s = max([1, *(len(c) for c in completions)])
    suffix_ids = torch.full((n, width_s), pad_id, dtype=torch.long)
    suffix_mask = torch.zeros((n, width_s), dtype=torch.bool)
    targets = torch.full((n, width_s), pad_id, dtype=torch.long)
    comp_mask = torch.zeros((n, width_s), dtype=torch.bool)
    values = {k: torch.zeros((n, width_s), dtype=torch.float32) for k in (token_values or {})}
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        suffix = [p[-1], *c[:-1]]
        suffix_ids[i, : len(suffix)] = torch.tensor(suffix, dtype=torch.long)
        suffix_mask[i, : len(suffix)] = True
        targets[i, : len(c)] = torch.tensor(list(c), dtype=torch.long)
        comp_mask[i, : len(c)] = True
        for k, per_seq in (token_values or {}).items():
            values[k][i, : len(c)] = per_seq[i][: len(c)].float()
    prompt_len_B1 = torch.tensor([len(p) for p in prompts], dtype=torch.long)[:, None]
    positions = prompt_len_B1 - 1 + torch.arange(width_s)[None]
    source_B = torch.tensor(source, dtype=torch.long)
    return SharedPrefixBatch(
        prefix_ids, prefix_mask, source_B, suffix_ids, suffix_mask, positions, targets, comp_mask, values,
        rows or list(range(n)),
    )  # fmt: skip


class _PrefixLayer(DynamicLayer):
    """The prefix pass's keys/values of one layer, ``[P, H, L, D]``: replaced, not appended, so the replay of a
    checkpointed layer in backward stores the same states again instead of doubling them."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        self.device = key_states.device
        return key_states, value_states


class _SharedPrefixLayer(DynamicLayer):
    """Hands the suffix pass ``[its prompt's prefix | its own]`` keys/values and stores nothing (safe to replay)."""

    keys: torch.Tensor
    values: torch.Tensor

    def __init__(self, prefix: _PrefixLayer, source_B: torch.Tensor) -> None:
        super().__init__()
        assert prefix.keys is not None and prefix.values is not None, "built from a filled prefix layer"
        self.keys, self.values, self.source_B = prefix.keys, prefix.values, source_B
        self.is_initialized, self.device = True, prefix.keys.device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        keys = torch.cat([self.keys.index_select(0, self.source_B), key_states], dim=-2)
        values = torch.cat([self.values.index_select(0, self.source_B), value_states], dim=-2)
        return keys, values


def shared_prefix_logits(model: Callable[..., Any], batch: SharedPrefixBatch, forward: CacheForward) -> torch.Tensor:
    """Logits ``[B, S, V]``: position t of row b predicts completion token t (see the module docstring).

    ``model`` is called like a Hugging Face causal LM (the policy, a peft model, or a reference wrapper around one
    of the same kind as the model ``forward`` was checked on).
    """
    suffix_inputs: dict[str, Any] = {}
    attention_BK = batch.suffix_mask_BS
    with _cache_through_checkpoints(model):
        if batch.prefix_ids_PL.shape[1] > 0:
            # A prompt of one token has an empty prefix: give its padded row one visible (dummy) key so no query of
            # the prefix pass attends to nothing (NaN in some attention kernels); the suffix's mask hides it again.
            visible_PL = batch.prefix_mask_PL.clone()
            visible_PL[:, 0] |= ~batch.prefix_mask_PL.any(dim=1)
            positions_PL = torch.arange(batch.prefix_ids_PL.shape[1], device=visible_PL.device).expand_as(visible_PL)
            prefix = Cache(layer_class_to_replicate=_PrefixLayer)
            model(
                input_ids=batch.prefix_ids_PL,
                attention_mask=visible_PL.long(),
                position_ids=positions_PL,
                use_cache=True,
                **{forward.cache_kwarg: prefix},
                **forward.last_logit_kwargs,
            )
            if not prefix.layers or not all(isinstance(layer, _PrefixLayer) for layer in prefix.layers):
                raise NotImplementedError(f"shared prefix: the prefix pass filled no cache ({prefix!r})")
            shared = Cache(
                layers=[_SharedPrefixLayer(cast(_PrefixLayer, layer), batch.source_B) for layer in prefix.layers]
            )
            attention_BK = torch.cat([batch.prefix_mask_PL[batch.source_B], batch.suffix_mask_BS], dim=1)
            suffix_inputs = {forward.cache_kwarg: shared, "use_cache": True}
        out = model(
            input_ids=batch.suffix_ids_BS,
            attention_mask=attention_BK.long(),
            position_ids=batch.suffix_positions_BS,
            **suffix_inputs,
        )
    return out.logits


@contextmanager
def _cache_through_checkpoints(model: Callable[..., Any]) -> Iterator[None]:
    """Let the model's activation-checkpointed layers keep the cache during this call (module docstring)."""
    layers = [
        m
        for m in (model.modules() if isinstance(model, torch.nn.Module) else ())
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
    ]
    saved = [vars(m).get("_can_checkpoint_with_cache") for m in layers]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m, value in zip(layers, saved, strict=True):
            if value is None:
                del m._can_checkpoint_with_cache
            else:
                m._can_checkpoint_with_cache = value


def shared_prefix_support(model: torch.nn.Module) -> CacheForward | str:
    """How to pass a cache to ``model`` for the shared-prefix forward, or why it cannot be used (a str)."""
    if _is_sharded(model):
        return (
            "the policy is FSDP-sharded: every forward is a collective, and the prefix pass would add forwards "
            "that ranks with other micro-batches do not run"
        )
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return f"peft {peft_config.peft_type} prepends virtual tokens; only adapters (LoRA) work"
    get_base_model = getattr(model, "get_base_model", None)  # a peft.PeftModel's transformers model
    base = get_base_model() if get_base_model is not None else model
    params = inspect.signature(base.forward).parameters
    kwarg = next((k for k in ("cache", "past_key_values") if k in params), None)
    if kwarg is None:
        return f"{type(base).__name__}.forward takes no 'cache' or 'past_key_values'"
    config = getattr(base, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    if attention not in SUPPORTED_ATTENTION:
        return f"attention implementation {attention!r}; supported: {SUPPORTED_ATTENTION}"
    layers = DynamicCache(config=config).layers
    if any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        return f"cache layers {kinds}: needs full attention (DynamicLayer) in every layer"
    reason = _checkpointing_refusal(model)
    if reason is not None:
        return reason
    return CacheForward(kwarg, {"logits_to_keep": 1} if "logits_to_keep" in params else {})


def _checkpointing_refusal(model: torch.nn.Module) -> str | None:
    """Why the model's activation checkpointing would drop the KV cache or the prefix's gradient (None: it won't)."""
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    checkpointed_layers = [m for m in checkpointed if isinstance(m, GradientCheckpointingLayer)]
    if checkpointed and not checkpointed_layers:
        return f"activation checkpointing of {type(checkpointed[0]).__name__} drops the KV cache"
    for m in checkpointed_layers:
        if not hasattr(m, "_can_checkpoint_with_cache"):  # older transformers: the layer always drops the cache
            return f"activation checkpointing of {type(m).__name__} drops the KV cache"
        func = getattr(m, "_gradient_checkpointing_func", None)
        if not isinstance(func, functools.partial) or func.keywords.get("use_reentrant") is not False:
            # Reentrant checkpointing runs the layer without autograd: no gradient would reach the prefix.
            return "activation checkpointing must be non-reentrant (use_reentrant=False)"
    return None


def cache_forward(model: torch.nn.Module) -> CacheForward:
    """:func:`shared_prefix_support`, raising ``NotImplementedError`` with the reason where it cannot be used."""
    support = shared_prefix_support(model)
    if isinstance(support, str):
        raise NotImplementedError(support)
    return support


def _is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP (1 or 2) manages the model."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel) or any(isinstance(m, FSDPModule) for m in model.modules())
