"""LoRA projections in the fused training forward (docs/algorithm.md §8.2, §8.3).

The fused prefix forward permutes the Q and K weight rows (:mod:`spiral_lit.fastpath.fused_prefix`), so it cannot
call a PEFT ``lora.Linear`` for them as a module. A LoRA projection is ``base(x) + B(A(dropout(x))) * scaling``;
permuting its output rows permutes the rows of the base weight and bias and of ``B``'s weight only, so
:class:`PermutedLinear` applies the same sum with those rows permuted, inside the autograd graph (the adapters'
gradients reach them in their own order). The other projections are called as the model's own modules, LoRA or
not. Only what this reproduces is accepted (:func:`lora_linear_refusal`): vanilla LoRA (no DoRA or other variant),
no dropout, no bias on ``B``, no hooks on the bypassed submodules. The refusal covers every adapter, active or not,
and ignores train/eval mode: the path is chosen once, when the updater is built, and must hold for the whole run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def is_lora_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a PEFT ``lora.Linear`` (False when peft is not installed)."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # pragma: no cover - depends on the environment
        return False
    return type(module) is Linear


def peft_base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a ``peft.PeftModel`` (its LoRA layers injected), else ``model`` itself."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - depends on the environment
        return model
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _active_adapters(module: Any) -> list[str]:
    """The adapters ``module``'s forward would add right now (none while adapters are disabled or merged)."""
    if module.disable_adapters or module.merged:
        return []
    return [name for name in module.active_adapters if name in module.lora_A]


def lora_linear_refusal(name: str, module: Any) -> str | None:
    """Why :class:`PermutedLinear` cannot stand in for the PEFT ``lora.Linear`` ``module`` (None: it can), for any of
    its adapters and in either train or eval mode."""
    if type(module.base_layer) is not nn.Linear:
        return f"{name}.base_layer is a {type(module.base_layer).__name__}, not a plain nn.Linear"
    bypassed = [("base_layer", module.base_layer)]
    for adapter in module.lora_A:
        if adapter in module.lora_variant:
            return f"{name} uses a LoRA variant ({type(module.lora_variant[adapter]).__name__}, e.g. DoRA)"
        dropout = module.lora_dropout[adapter]
        if type(dropout) is not nn.Identity and float(getattr(dropout, "p", 1.0)) > 0:
            return f"{name} applies LoRA dropout"
        if module.lora_B[adapter].bias is not None:
            return f"{name}.lora_B has a bias"
        bypassed += [(f"lora_A.{adapter}", module.lora_A[adapter]), (f"lora_B.{adapter}", module.lora_B[adapter])]
    for child, sub in bypassed:
        if sub._forward_hooks or sub._forward_pre_hooks or hasattr(sub, "_hf_hook"):
            return f"{name}.{child} has forward hooks, which a fused step would skip"
    return None


class PermutedLinear:
    """A plain or LoRA linear layer with its outputs in the order ``order_O``, as one callable.

    The permuted weights are indexed once per training forward, inside the autograd graph, as the fused prefix
    forward does for plain Q and K weights.
    """

    def __init__(self, module: Any, order_O: torch.Tensor) -> None:
        base = module.base_layer if is_lora_linear(module) else module
        self.weight_OI = base.weight[order_O]
        self.bias_O = None if base.bias is None else base.bias[order_O]
        self.adapters: list[tuple[torch.Tensor, torch.Tensor, float]] = []
        if base is not module:
            for adapter in _active_adapters(module):
                a_RI = module.lora_A[adapter].weight
                self.adapters.append((a_RI, module.lora_B[adapter].weight[order_O], float(module.scaling[adapter])))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T + b`` plus each adapter's ``((x @ A^T) @ B^T) * scaling``, in PEFT's order of operations: the
        input cast to the adapter's dtype, the sum cast back to the base output's dtype."""
        result = F.linear(x, self.weight_OI, self.bias_O)
        if not self.adapters:
            return result
        dtype = result.dtype
        for a_RI, b_OR, scaling in self.adapters:
            x = x.to(a_RI.dtype)
            result = result + F.linear(F.linear(x, a_RI), b_OR) * scaling
        return result.to(dtype)
