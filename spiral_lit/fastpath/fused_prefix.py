"""The shared-prefix training forward of a Llama-family model, written out over its modules (docs/algorithm.md §8.2).

:func:`spiral_lit.training.prefix_forward.shared_prefix_logits` runs the model's ``forward`` twice (the distinct
prompts,
then every row's completion on a KV cache) and hands each row's attention its prompt's keys/values gathered per
row. In SPIRAL's aggregation shape (~375-token prompts, 4 rows each) those gathered copies, their gradient buffers
and the scatter that sums the gradients back were about a third of the update's time on CPU. :func:`fused_prefix_logits`
computes the same logits without per-row copies of long prompts:

- a completion attends to its prompt's keys, which all rows of that prompt share, and to its own keys, causal
  (:func:`shared_prefix_attention`): where a prompt's rows are short next to it (aggregation prompts), its rows
  are stacked into one query sequence for one fused attention call under a block-diagonal mask; else (GRPO's
  short prompts, 8 rows each) each row takes a copy of its short prompt's keys/values into one fused call;
- the prompt pass is plain causal attention (prompts are right-padded, so a real token never sees padding) and
  stops after the last layer's keys/values (no last-layer attention output, MLP, norm or ``lm_head``);
- as in the fused decode step (:mod:`spiral_lit.fastpath.decode`), Q and K come out with each head's halves
  interleaved (their weight rows permuted inside the autograd graph, so the gradient reaches the parameters in
  their own order) so rotary is one complex multiplication, and RMSNorm is ``F.rms_norm``; Qwen3's per-head q/k
  norms take their weights permuted alike, also inside the graph. Unlike decode, the projections stay separate
  matmuls: with thousands of rows per matmul, fusing them was slower.

Embedding, rotary module, activation, norms and ``lm_head`` are the model's own modules, so their hooks run.
Log-probs and gradients equal the model-forward path up to rounding (tests/fastpath/test_fused_prefix.py), in fp32,
with bf16 weights, and under bf16 autocast (``precision: bf16-mixed``: the matmuls run in bf16, rotary in fp32). Models
it does not reproduce, and policies off the CPU where it was never measured (:func:`fused_prefix_refusal`: other
classes, GPUs, LoRA variants or dropout, hooks on bypassed modules, activation checkpointing, attention dropout),
use the model-forward path. Plain LoRA adapters (``policy.lora``) run inside it
(:mod:`spiral_lit.fastpath.lora_linear`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from spiral_lit.fastpath.decode import QK_NORM_MODEL_CLASSES, fused_decode_refusal
from spiral_lit.fastpath.layers import head_rms_norm, rms_norm
from spiral_lit.fastpath.lora_linear import PermutedLinear, peft_base_model


class PrefixBatch(Protocol):
    """What this forward reads of a :class:`~spiral_lit.training.prefix_forward.SharedPrefixBatch` (the training
    layer, which this one does not import)."""

    prefix_ids_PL: torch.Tensor
    prefix_mask_PL: torch.Tensor
    source_B: torch.Tensor
    suffix_ids_BS: torch.Tensor
    suffix_positions_BS: torch.Tensor


def fused_prefix_refusal(model: object) -> str | None:
    """Why :func:`fused_prefix_logits` cannot stand in for the model-forward path (None: it can). A
    ``peft.PeftModel`` is judged by the model inside it, LoRA projections accepted."""
    if not isinstance(model, nn.Module):
        return f"{type(model).__name__} is not a torch module"
    model = peft_base_model(model)
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type != "cpu":
        # Measured on CPU only; on GPUs the block-diagonal mask would rule out flash attention.
        return f"the policy is on {parameter.device.type}, and this path is measured on CPU only"
    reason = fused_decode_refusal(model, lora=True)
    if reason is not None:
        return reason
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return "activation checkpointing is on"
    if model.training and float(getattr(model.config, "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout is on"
    return None


def prompt_runs(source_B: Sequence[int]) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Row order with each prompt's rows together, and the runs of prompts with equally many rows.

    ``source_B[b]`` is row b's prompt; prompts are numbered in order of first appearance (as
    :func:`spiral_lit.training.prefix_forward.pack_shared_prefix` numbers them). Returns ``(order, runs)``: ``order``
    lists
    the rows prompt by prompt (each prompt's rows in their original order), ``runs`` are ``(first prompt, end
    prompt, rows per prompt)`` over consecutive prompts, covering ``order`` in turn.
    """
    rows: dict[int, list[int]] = {}
    for b, p in enumerate(source_B):
        rows.setdefault(p, []).append(b)
    prompts = sorted(rows)
    if prompts != list(range(len(prompts))) or list(rows) != prompts:
        raise ValueError(f"prompt_runs: prompts must be numbered 0.. in order of first appearance, got {source_B}")
    order = [b for p in prompts for b in rows[p]]
    runs: list[tuple[int, int, int]] = []
    for p in prompts:
        if runs and runs[-1][2] == len(rows[p]):
            runs[-1] = (runs[-1][0], p + 1, runs[-1][2])
        else:
            runs.append((p, p + 1, len(rows[p])))
    return order, runs


def gathered_attention(
    q_PnSHD: torch.Tensor,
    k_PnSKD: torch.Tensor,
    v_PnSKD: torch.Tensor,
    k_prefix_PLKD: torch.Tensor,
    v_prefix_PLKD: torch.Tensor,
    keep_prefix_PL: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Attention of P prompts' n rows each over [their prompt's prefix | their own keys, causal]: ``[P n, S, H D]``.

    Each row gets its own copy of its prompt's keys/values in front of its own, and all rows go through one fused
    attention call. Where prompts are short next to their rows (GRPO: 53-token prompts, 8 rows of 64 tokens), the
    copies are small, and the fused kernel's forward and backward took half the time of scoring the prefix with
    one batched matmul and a separate softmax. ``keep_prefix_PL``: True = a real prefix token; K key heads
    are shared by H / K query heads each (grouped-query attention). Every query sees its own key, so no softmax row
    is empty.
    """
    P, n, S, H, D = q_PnSHD.shape
    K, L = k_PnSKD.shape[3], k_prefix_PLKD.shape[1]
    q = q_PnSHD.reshape(P * n, S, H, D).transpose(1, 2)
    k, v = (torch.cat([prefix[:, None].expand(P, n, L, K, D), own], dim=2).reshape(P * n, L + S, K, D).transpose(1, 2)
            for prefix, own in ((k_prefix_PLKD, k_PnSKD), (v_prefix_PLKD, v_PnSKD)))  # fmt: skip
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    keep_PSX = torch.cat([keep_prefix_PL[:, None, :].expand(P, S, L), causal_SS.expand(P, S, S)], dim=-1)
    keep = keep_PSX[:, None].expand(P, n, S, L + S).reshape(P * n, 1, S, L + S)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scaling, enable_gqa=K != H)
    return out.transpose(1, 2).reshape(P * n, S, H * D)


def stacked_attention(
    q_PnSHD: torch.Tensor,
    k_PnSKD: torch.Tensor,
    v_PnSKD: torch.Tensor,
    k_prefix_PLKD: torch.Tensor,
    v_prefix_PLKD: torch.Tensor,
    keep_prefix_PL: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """:func:`gathered_attention` without the per-row prefix copies: ``[P n, S, H D]``.

    Each prompt's n rows are stacked into one query sequence over [prefix | all n rows' keys] under a
    block-diagonal causal mask, so no row needs its own copy of a long prefix, at the price of scoring every query
    against its prompt's other rows too (masked out).
    """
    P, n, S, H, D = q_PnSHD.shape
    K, L = k_PnSKD.shape[3], k_prefix_PLKD.shape[1]
    q = q_PnSHD.reshape(P, n * S, H, D).transpose(1, 2)
    k, v = (torch.cat([prefix, own.reshape(P, n * S, K, D)], dim=1).transpose(1, 2)
            for prefix, own in ((k_prefix_PLKD, k_PnSKD), (v_prefix_PLKD, v_PnSKD)))  # fmt: skip
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    own_keep = torch.block_diag(*[causal_SS] * n)  # [n S, n S]: a row sees its own earlier tokens only
    keep = torch.cat([keep_prefix_PL[:, None, :].expand(P, n * S, L), own_keep.expand(P, n * S, n * S)], dim=-1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None], scale=scaling, enable_gqa=K != H)
    return out.transpose(1, 2).reshape(P * n, S, H * D)


def shared_prefix_attention(
    q_BSHD: torch.Tensor,
    k_BSKD: torch.Tensor,
    v_BSKD: torch.Tensor,
    k_prefix_PLKD: torch.Tensor,
    v_prefix_PLKD: torch.Tensor,
    keep_prefix_PL: torch.Tensor,
    runs: Sequence[tuple[int, int, int]],
    scaling: float,
) -> torch.Tensor:
    """Attention of rows ordered prompt by prompt (``runs`` of :func:`prompt_runs`): ``[B, S, H D]``.

    Per run, :func:`stacked_attention` where a prompt's rows hold no more tokens than its prefix (aggregation
    prompts: at most 2x the needed scores, and no per-row copy of a long prefix), else :func:`gathered_attention`
    (GRPO's short prompts with 8 rows each, where stacking would score 5x the needed keys). Measured fwd + bwd per
    layer on this CPU: aggregation shape 83 ms stacked vs 114 ms gathered; GRPO shape 11 ms gathered vs 32 ms
    stacked.
    """
    B, S, H, D = q_BSHD.shape
    K, L = k_BSKD.shape[2], k_prefix_PLKD.shape[1]
    outputs, r0 = [], 0
    for p0, p1, n in runs:
        P, r1 = p1 - p0, r0 + (p1 - p0) * n
        attention = stacked_attention if n * S <= L else gathered_attention
        outputs.append(
            attention(
                q_BSHD[r0:r1].view(P, n, S, H, D),
                k_BSKD[r0:r1].view(P, n, S, K, D),
                v_BSKD[r0:r1].view(P, n, S, K, D),
                k_prefix_PLKD[p0:p1],
                v_prefix_PLKD[p0:p1],
                keep_prefix_PL[p0:p1],
                scaling,
            )  # fmt: skip
        )
        r0 = r1
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class _Layer:
    """One decoder layer with Q and K weights in interleaved head-dim order (permuted inside the autograd graph).

    ``layer`` is a transformers decoder layer, typed ``Any``: its submodules are ``nn.Module`` attributes that a
    type checker cannot see.
    """

    def __init__(
        self, layer: Any, q_order: torch.Tensor, k_order: torch.Tensor, qk_norm_order: torch.Tensor | None
    ) -> None:
        """``qk_norm_order``: the head-dim order in which the q/k norms' weights are applied (None: no q/k norms)."""
        attn = layer.self_attn
        self.layer = layer
        # Separate matmuls: on CPU, concatenating Q/K/V or gate/up into one wider matmul was slower in training.
        self.q, self.k = PermutedLinear(attn.q_proj, q_order), PermutedLinear(attn.k_proj, k_order)
        self.q_norm = None if qk_norm_order is None else _permuted_norm(attn.q_norm, qk_norm_order)
        self.k_norm = None if qk_norm_order is None else _permuted_norm(attn.k_norm, qk_norm_order)

    def qkv(self, hidden: torch.Tensor, rotation: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, ...]:
        """Rotated Q ``[..., H, D]``, rotated K and V ``[..., K, D]`` of the normed ``hidden``."""
        x = rms_norm(self.layer.input_layernorm, hidden)
        D = self.layer.self_attn.head_dim
        q, k = (_rotate(_head_norm(projection(x).unflatten(-1, (n, D)), norm), rotation)
                for projection, n, norm in ((self.q, heads, self.q_norm), (self.k, kv_heads, self.k_norm)))  # fmt: skip
        return q, k, self.layer.self_attn.v_proj(x).unflatten(-1, (kv_heads, D))

    def finish(self, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """The layer's output from its input ``hidden`` and its attention output ``[..., H * D]``."""
        hidden = self.layer.self_attn.o_proj(attention) + hidden
        mlp = self.layer.mlp
        x = rms_norm(self.layer.post_attention_layernorm, hidden)
        return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)) + hidden


def _permuted_norm(norm: Any, order_D: torch.Tensor) -> tuple[torch.Tensor, float]:
    """An RMSNorm's weight in head-dim order ``order_D`` (inside the autograd graph) and its epsilon."""
    return norm.weight[order_D], float(norm.variance_epsilon)


def _head_norm(x_NHD: torch.Tensor, norm: tuple[torch.Tensor, float] | None) -> torch.Tensor:
    """``x_NHD`` through a q/k norm given as (weight in the heads' dim order, epsilon); unchanged without one."""
    return x_NHD if norm is None else head_rms_norm(x_NHD, *norm)


def _rotate(x_NHD: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of heads whose dims come as interleaved pairs: one complex multiplication.

    In float32 whatever the weights' dtype (complex bf16 does not exist), as the fused decode step does, so a bf16
    policy's training forward rotates exactly as its sampler did; no-op casts in fp32.
    """
    pairs = torch.view_as_complex(x_NHD.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x_NHD.dtype)


def _rotation(inner: Any, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The model's rotary cos/sin at ``positions`` as one complex factor per interleaved pair: ``[..., 1, D / 2]``."""
    cos, sin = inner.rotary_emb(hidden, positions)
    half = cos.shape[-1] // 2
    # cos/sin repeat over the two halves (the rotary classes fused_decode_refusal accepts), so the model's
    # q cos + rotate_half(q) sin is (x_j + i x_j+h)(cos_j + i sin_j) on interleaved pairs.
    return torch.complex(cos[..., :half].float(), sin[..., :half].float()).unsqueeze(-2)


def fused_prefix_logits(model: nn.Module, batch: PrefixBatch) -> torch.Tensor:
    """Logits ``[B, S, V]`` of a :class:`~spiral_lit.training.prefix_forward.SharedPrefixBatch`, as
    :func:`~spiral_lit.training.prefix_forward.shared_prefix_logits` computes them, for a model that
    :func:`fused_prefix_refusal` accepts."""
    hf: Any = peft_base_model(model)  # a transformers causal LM: submodules a type checker cannot see
    inner, config = hf.model, hf.config
    H, K = config.num_attention_heads, config.num_key_value_heads
    decoder = list(inner.layers[: config.num_hidden_layers])
    D = decoder[0].self_attn.head_dim
    scaling = decoder[0].self_attn.scaling
    interleave_D = torch.arange(D, device=batch.suffix_ids_BS.device).view(2, D // 2).t().reshape(D)
    q_order, k_order = ((torch.arange(n, device=interleave_D.device)[:, None] * D + interleave_D).reshape(-1)
                        for n in (H, K))  # fmt: skip
    qk_norm_order = interleave_D if type(hf).__name__ in QK_NORM_MODEL_CLASSES else None
    layers = [_Layer(layer, q_order, k_order, qk_norm_order) for layer in decoder]
    P, L = batch.prefix_ids_PL.shape
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    if L > 0:
        hidden = inner.embed_tokens(batch.prefix_ids_PL)
        positions = torch.arange(L, device=hidden.device).expand(P, L)
        rotation = _rotation(inner, hidden, positions)
        for i, layer in enumerate(layers):
            q, k, v = layer.qkv(hidden, rotation, H, K)
            prefix_kv.append((k, v))  # [P, L, K, D]
            if i + 1 < len(layers):  # the last layer's output is not needed, only its keys/values
                # Right-padded prompts: causal attention never shows a real token any padding.
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scaling,
                    enable_gqa=K != H,
                )  # fmt: skip
                hidden = layer.finish(hidden, out.transpose(1, 2).flatten(-2))
    order, runs = prompt_runs(batch.source_B.tolist())
    identity = order == list(range(len(order)))
    order_B = torch.tensor(order, device=batch.suffix_ids_BS.device)
    ids_BS, positions_BS = batch.suffix_ids_BS, batch.suffix_positions_BS
    if not identity:
        ids_BS, positions_BS = ids_BS[order_B], positions_BS[order_B]
    hidden = inner.embed_tokens(ids_BS)
    rotation = _rotation(inner, hidden, positions_BS)
    for i, layer in enumerate(layers):
        q, k, v = layer.qkv(hidden, rotation, H, K)
        if L > 0:
            out = shared_prefix_attention(q, k, v, *prefix_kv[i], batch.prefix_mask_PL, runs, scaling)
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scaling,
                enable_gqa=K != H,
            ).transpose(1, 2).flatten(-2)  # fmt: skip
        hidden = layer.finish(hidden, out)
    if not identity:
        hidden = hidden[torch.argsort(order_B)]
    return hf.lm_head(rms_norm(inner.norm, hidden))
