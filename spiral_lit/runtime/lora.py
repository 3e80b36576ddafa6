"""LoRA adapters through ``peft`` (docs/algorithm.md §8.3): the paper trains Qwen3-4B-Instruct with a rank-32 LoRA.

``policy.lora`` in YAML turns it on. The adapted model stays a ``peft.PeftModel`` (``module.policy``),
so export can detect it and merge the adapter. With a KL penalty, the reference log-probabilities
come from the same model with the adapter switched off (:class:`AdapterDisabledReference`): the
frozen base weights *are* the starting policy, so no second copy of the model is kept.

Install: ``pip install 'spiral_lit[lora]'`` (peft).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

import torch

from spiral_lit.errors import UserError

if TYPE_CHECKING:
    from peft import PeftModel

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings:
    """Low-rank adapters on the policy's linear layers; only their weights are trained."""

    rank: int = 32
    """Rank r of each adapter (the paper: 32)."""
    alpha: float = 64.0
    """Scale numerator: the adapter's update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input; keep 0 for RL, where it makes the trainer's log-probs differ from the
    sampler's."""
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """Names (suffixes) of the linear modules that get an adapter, or ``[all-linear]``; the default covers the
    attention and MLP projections of Llama/Qwen/Mistral."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserError(f"policy.lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise UserError(f"policy.lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"policy.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise UserError("policy.lora.target_modules is empty: name the linear layers to adapt, e.g. [q_proj]")


def _peft() -> Any:
    try:
        import peft
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("policy.lora needs peft: pip install 'spiral_lit[lora]'") from error
    return peft


def apply_lora(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """Wrap ``model`` in a ``peft.PeftModel`` with fresh adapters; the base weights are frozen."""
    peft = _peft()
    targets: str | list[str] = "all-linear" if settings.target_modules == ["all-linear"] else settings.target_modules
    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as error:
        raise UserError(f"policy.lora.target_modules={settings.target_modules}: {error}") from error


def is_lora(model: torch.nn.Module) -> TypeGuard[PeftModel]:
    """Whether ``model`` is a ``peft.PeftModel`` (False when peft is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - depends on the environment
        return False
    return isinstance(model, PeftModel)


def adapted_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a PeftModel (adapters injected and active), else ``model`` itself.

    The rollout engines call this one: it has the model's own ``forward`` signature (``logits_to_keep``,
    the cache argument), which ``PeftModel.forward`` hides behind ``**kwargs``.
    """
    return model.get_base_model() if is_lora(model) else model


class AdapterDisabledReference:
    """The KL reference policy: ``model`` with its LoRA adapters switched off for the call.

    Called like a model (``reference(input_ids=..., attention_mask=...)``); gradients are never needed,
    so it runs under ``no_grad``.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        if not is_lora(model):
            raise TypeError(f"AdapterDisabledReference needs a peft.PeftModel, got {type(model).__name__}")
        self.model = model

    def __call__(self, **inputs: Any) -> Any:
        with torch.no_grad(), self.model.disable_adapter():
            return self.model(**inputs)
