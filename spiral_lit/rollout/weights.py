"""The policy's weights as an inference engine loads them: checkpoint names, LoRA merged (docs/algorithm.md §8.1).

An engine that keeps its own copy of the weights (vLLM) needs, after every update, the tensors
a ``save_pretrained`` of the *merged* model would hold. :func:`policy_weights` yields them one
at a time without touching the training model: for a LoRA layer it yields
``W + scale * B @ A`` computed on the fly (peft's ``get_delta_weight``), never merging in place,
so the optimiser's parameters and their state are left alone and at most one merged matrix
exists at a time. :func:`weights_fingerprint` tells cheaply whether any parameter changed.

peft is imported only when the model holds peft layers (it is an optional extra).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper


def _peft_classes() -> tuple[type[LoraLayer], type[ModulesToSaveWrapper]] | None:
    """(LoraLayer, ModulesToSaveWrapper), or None when peft is not installed."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:
        return None
    return LoraLayer, ModulesToSaveWrapper


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a ``peft.PeftModel`` (the model itself otherwise)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _merged_lora(layer: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """A LoRA layer's base weight (and bias) plus every active, not yet merged adapter.

    ``layer`` is a peft ``LoraLayer`` module, typed ``Any``: its weights and adapter dicts are ``nn.Module``
    attributes that a type checker sees only as ``Tensor | Module``.
    """
    base = layer.get_base_layer()
    if not torch.is_floating_point(base.weight):
        raise NotImplementedError(
            f"{prefix.rstrip('.')}: the base weight is quantized ({base.weight.dtype}); syncing merged LoRA weights "
            "to the rollout engine needs a floating-point base model"
        )
    adapters = [] if layer.disable_adapters else [a for a in layer.active_adapters if a in layer.lora_A]
    adapters = [a for a in adapters if a not in layer.merged_adapters]  # merged ones are already in the base weight
    weight, bias = base.weight.detach(), getattr(base, "bias", None)
    bias = bias.detach() if bias is not None else None
    for adapter in adapters:
        if adapter in getattr(layer, "lora_variant", {}):
            raise NotImplementedError(
                f"{prefix.rstrip('.')}: adapter {adapter!r} is a LoRA variant (e.g. DoRA); only plain LoRA can be "
                "merged for the rollout engine"
            )
        weight = weight + layer.get_delta_weight(adapter).detach().to(weight.dtype)
        if layer.lora_bias.get(adapter) and bias is not None:
            bias = bias + layer.lora_B[adapter].bias.detach() * layer.scaling[adapter]
    yield f"{prefix}weight", weight
    if bias is not None:
        yield f"{prefix}bias", bias


def _walk(
    module: torch.nn.Module,
    prefix: str,
    peft: tuple[type[LoraLayer], type[ModulesToSaveWrapper]] | None,
    seen: set[int],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Depth-first over ``module``; ``seen`` holds the ids of tensors already yielded (tied weights come once)."""
    if peft is not None and isinstance(module, peft[0]):
        yield from _merged_lora(module, prefix)
        return
    if peft is not None and isinstance(module, peft[1]):
        # modules_to_save: the trained copy of the active adapter replaces the original module.
        active = [] if module.disable_adapters else [a for a in module.active_adapters if a in module.modules_to_save]
        yield from _walk(module.modules_to_save[active[0]] if active else module.original_module, prefix, peft, seen)
        return
    persistent = [(n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
    for name, tensor in [*module.named_parameters(recurse=False), *persistent]:
        if id(tensor) not in seen:  # lm_head.weight tied to embed_tokens.weight: the engine ties them itself
            seen.add(id(tensor))
            yield f"{prefix}{name}", tensor.detach()
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}{name}.", peft, seen)


def policy_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` as in the merged model's ``state_dict``; a tensor shared by two names (tied) comes once.

    Works for a plain transformers model, a ``peft.PeftModel`` and a model with LoRA layers injected in place.
    The tensors alias the training parameters unless LoRA-merged: copy them before changing them.
    """
    yield from _walk(_base_model(model), "", _peft_classes(), set())


def weights_fingerprint(model: torch.nn.Module) -> tuple[tuple[int, int], ...]:
    """Identity and in-place version counter of every parameter: changes when an optimiser step or a
    ``load_state_dict`` writes a parameter, or when a module is replaced (e.g. LoRA layers injected)."""
    return tuple((id(p), p._version) for p in model.parameters())
