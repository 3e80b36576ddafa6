"""One decode step of a Llama-family model written out over its modules, fused projections (docs/algorithm.md §8.1).

The engine's generic decode step is the model's ``forward``. :class:`FusedDecoder` computes the
same step with less work around the matmuls, which is what a 2-core CPU spends a decode step's
non-matmul time on:

- Q, K and V come from one matmul against their weights concatenated along the output, gate
  and up from another; per layer and step that is 4 matmuls instead of 7, and no transformers
  plumbing (kwargs, cache dispatch, output capture, mask building).
- On CPU in fp32 each projection's weight is also packed by MKL for the chunk's row count
  (:class:`_Projection`): with ~128 rows per step, the repacking of the weight that every plain
  ``F.linear`` does internally costs a quarter of the matmul time.
- The weight copies (concatenated and packed) are made once per ``generate`` call, so they are
  the weights being trained right now; they cost about one extra copy of the decoder weights
  while the call runs.
- Q and K come out of their projection with each head's two halves interleaved (the weight
  rows permuted at fusing; q.k does not change when both are permuted alike), so the model's
  rotary embedding ``q cos + rotate_half(q) sin`` is one complex multiplication for all Q and
  K heads instead of five ops each. The prefilled prompt keys are permuted once per chunk.
  Qwen3's per-head q/k RMSNorms (before rotary) run on the permuted heads with their weights
  permuted alike (:func:`~spiral_lit.fastpath.layers.head_rms_norm`).
- Keys/values are written in place into the engine's block cache and attention is the
  shared-prompt attention of :mod:`spiral_lit.fastpath.attention`.

Embedding, the rotary module, the activation and ``lm_head`` are called as the model's own
modules, so hooks on them still run (the benchmark bans EOS with an ``lm_head`` hook); the
RMSNorms too, except that a hook-free fp32 RMSNorm of these classes runs as ``F.rms_norm``
(bitwise the same, one call instead of seven). Logits differ from the model's forward only by matmul rounding (~1e-6
relative in fp32; ``tests/fastpath/test_decode.py`` checks rollouts and log-probabilities).

Only models whose step this reproduces are accepted (:func:`fused_decode_refusal`): Llama,
Qwen2, Qwen3 and Mistral classes with plain ``nn.Linear`` projections, full attention, and no
hooks on the modules it bypasses. Anything else (a PEFT/LoRA wrapper, quantised linears,
sliding-window layers, a forward hook on the model) decodes through the model's ``forward``;
:meth:`FusedDecoder.maybe` logs why, once per reason and process.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from spiral_lit.fastpath.attention import SharedPrefix, shared_prefix_attention
from spiral_lit.fastpath.layers import RMS_NORM_CLASSES, head_rms_norm, rms_norm
from spiral_lit.fastpath.lora_linear import is_lora_linear, lora_linear_refusal

logger = logging.getLogger(__name__)

FUSED_MODEL_CLASSES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"})
"""Causal LMs whose decode step is embed -> [norm, attention, norm, gated MLP] x L -> norm -> lm_head."""
QK_NORM_MODEL_CLASSES = frozenset({"Qwen3ForCausalLM"})
"""Those of :data:`FUSED_MODEL_CLASSES` whose attention RMS-normalises each Q and K head before rotary."""

_ROTARY_CLASSES = frozenset(
    {"LlamaRotaryEmbedding", "Qwen2RotaryEmbedding", "Qwen3RotaryEmbedding", "MistralRotaryEmbedding"}
)
"""Rotary modules whose cos/sin repeat over the two halves of the head dim (``cat((freqs, freqs))``)."""
_LAYER_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_ATTENTION_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_QK_NORM_CHILDREN = {"q_norm", "k_norm"}
_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}
_fallbacks_logged: set[str] = set()


def _children(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_children()}


def log_fallback_once(log: logging.Logger, message: str) -> None:
    """``log`` ``message`` as a warning the first time in this process: the fast paths are picked per ``generate``
    call and per updater, so a refusal would otherwise repeat at every step. A warning, not info: the project
    configures no logging, and a run that silently takes the slower path is what this is for."""
    if message not in _fallbacks_logged:
        _fallbacks_logged.add(message)
        log.warning(message)


def _qk_norm_refusal(i: int, attn: Any) -> str | None:
    """Why layer ``i``'s q/k norms cannot run as :func:`head_rms_norm` with their weights (None: they can)."""
    for name in ("q_norm", "k_norm"):
        kind = type(getattr(attn, name)).__name__
        if kind not in RMS_NORM_CLASSES:
            return f"layers.{i}.self_attn.{name} is a {kind}, not one of {sorted(RMS_NORM_CLASSES)}"
    if attn.q_norm.variance_epsilon != attn.k_norm.variance_epsilon:
        return f"layers.{i}.self_attn q_norm and k_norm have different epsilons"
    return None


def fused_decode_refusal(model: nn.Module, lora: bool = False) -> str | None:
    """Why :class:`FusedDecoder` cannot stand in for ``model.forward`` in decode (None: it can). ``lora``: also
    accept PEFT LoRA projections that :func:`~spiral_lit.fastpath.lora_linear.lora_linear_refusal` accepts (the
    fused training forward applies them; the decode step does not)."""
    if type(model).__name__ not in FUSED_MODEL_CLASSES:
        return f"model class {type(model).__name__} is not one of {sorted(FUSED_MODEL_CLASSES)}"
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return "global module forward hooks are registered"
    if model.device.type not in ("cpu", "cuda"):
        return f"device {model.device.type} (complex rotary and MKL packing are only exercised on cpu and cuda)"
    hf: Any = model  # a transformers causal LM: its submodules and config are attributes a type checker cannot see
    inner = hf.model
    if type(inner.rotary_emb).__name__ not in _ROTARY_CLASSES:
        return f"rotary embedding {type(inner.rotary_emb).__name__} is not one of {sorted(_ROTARY_CLASSES)}"
    bypassed: list[tuple[str, nn.Module]] = [("model", model), ("model.model", inner)]
    attn: Any  # None when the layer lacks it (then _children(layer) already differs)
    mlp: Any
    qk_norm = type(model).__name__ in QK_NORM_MODEL_CLASSES
    attention_children = _ATTENTION_CHILDREN | (_QK_NORM_CHILDREN if qk_norm else set())
    for i, layer in enumerate(inner.layers[: hf.config.num_hidden_layers]):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if (
            _children(layer) != _LAYER_CHILDREN
            or _children(attn) != attention_children
            or _children(mlp) != _MLP_CHILDREN
        ):
            return f"layer {i} has modules other than {sorted(_LAYER_CHILDREN | attention_children | _MLP_CHILDREN)}"
        if getattr(attn, "sliding_window", None) is not None or getattr(model.config, "sliding_window", None):
            return f"layer {i} uses sliding-window attention"
        reason = _qk_norm_refusal(i, attn) if qk_norm else None
        if reason is not None:
            return reason
        bypassed += [(f"layers.{i}", layer), (f"layers.{i}.self_attn", attn), (f"layers.{i}.mlp", mlp)]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", *(("q_norm", "k_norm") if qk_norm else ())):
            bypassed.append((f"layers.{i}.self_attn.{name}", getattr(attn, name)))
        for name in ("gate_proj", "up_proj", "down_proj"):
            bypassed.append((f"layers.{i}.mlp.{name}", getattr(mlp, name)))
    for name, module in bypassed:
        if module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"):
            return f"{name} has forward hooks (torch or accelerate's), which a fused step would skip"
        if name.endswith("_proj") and type(module) is not nn.Linear:
            if lora and is_lora_linear(module):
                reason = lora_linear_refusal(name, module)
                if reason is not None:
                    return reason
                continue
            kind = type(module)
            return f"{name} is a {kind.__module__}.{kind.__qualname__} (LoRA or quantised), not a plain nn.Linear"
    return None


def _packing(weight: torch.Tensor) -> str | None:
    """Which packed matmul runs this weight on CPU: MKL's sgemm for float32 outside autocast, oneDNN's for bf16
    (the weight copy under bf16 autocast, or a bf16 model); None: plain ``F.linear``."""
    if weight.device.type != "cpu":
        return None
    if weight.dtype == torch.float32:
        mkl = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
        # Under autocast F.linear runs in the autocast dtype, as the model would: no fp32 packing then.
        return "mkl" if mkl and not torch.is_autocast_enabled("cpu") else None
    if weight.dtype == torch.bfloat16:
        onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        return "onednn" if onednn and torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return None


class _Projection:
    """``nn.Linear`` layers applied as one matmul, their weights concatenated along the output dimension.

    On CPU in fp32 the weight can also be packed by MKL for a given row count (``pack``; the
    op torch.compile's CPU weight freezing uses): a decode step multiplies ~128 rows by every
    weight, few enough that the weight repacking inside each plain matmul is a large share of
    the work. Packed, the 50M benchmark model's decode matmuls ran ~25% faster. Under bf16 autocast the bf16 weight
    copy is packed for oneDNN's bf16 matmul instead (the numbers of autocast's ``F.linear``, bit for bit; 1.1-1.35x
    faster on the 50M model's decode shapes, benchmarks/README.md, "FLOP/s account").
    Other row counts, e.g. after a compaction, use ``F.linear`` on the unpacked weight; both
    give the same numbers up to rounding.
    """

    def __init__(self, linears: list[nn.Linear], output_orders: list[torch.Tensor | None] | None = None) -> None:
        """``output_orders[i]``: the order in which linear ``i``'s outputs come out (None: as they are)."""
        orders = output_orders or [None] * len(linears)
        weights = [
            m.weight.detach() if o is None else m.weight.detach()[o] for m, o in zip(linears, orders, strict=True)
        ]
        weight_OI = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.bias_O: torch.Tensor | None = None
        if any(m.bias is not None for m in linears):
            biases = [m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears]
            self.bias_O = torch.cat([b if o is None else b[o] for b, o in zip(biases, orders, strict=True)])
        # Under autocast (``precision: bf16-mixed``) F.linear would cast the weight at every decode step; cast the
        # copy once instead (the same numbers: autocast rounds the weight to the same dtype).
        device_type = weight_OI.device.type
        if torch.is_autocast_enabled(device_type) and weight_OI.is_floating_point():
            dtype = torch.get_autocast_dtype(device_type)
            weight_OI = weight_OI.to(dtype)
            self.bias_O = self.bias_O.to(dtype) if self.bias_O is not None else None
        self.weight_OI = weight_OI
        self.packed: torch.Tensor | None = None
        self.packed_rows = 0
        self.kind: str | None = None

    def pack(self, rows: int) -> None:
        """Pack the weight for matmuls with ``rows`` rows (no-op where no packed matmul is available)."""
        kind = _packing(self.weight_OI)
        if kind is None:
            self.packed, self.packed_rows, self.kind = None, 0, None
        elif (kind, rows) != (self.kind, self.packed_rows):
            if kind == "mkl":
                packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight_OI, rows)
            else:
                packed = torch.ops.mkldnn._reorder_linear_weight(self.weight_OI, rows)
            self.packed, self.packed_rows, self.kind = packed, rows, kind

    def __call__(self, x_BI: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x_BI.shape[0] == self.packed_rows:
            if self.kind == "mkl":
                return torch.ops.mkl._mkl_linear(x_BI, self.packed, self.weight_OI, self.bias_O, self.packed_rows)
            # oneDNN's bf16 matmul on the packed weight: the input cast as autocast's F.linear would cast it.
            x_BI = x_BI.to(self.weight_OI.dtype)
            return torch.ops.mkldnn._linear_pointwise(x_BI, self.packed, self.bias_O, "none", [], "")
        return F.linear(x_BI, self.weight_OI, self.bias_O)


class FusedDecoder:
    """The decode step of a model accepted by :func:`fused_decode_refusal`, from weights fused at construction."""

    def __init__(self, model: PreTrainedModel) -> None:
        reason = fused_decode_refusal(model)
        if reason is not None:
            raise ValueError(f"FusedDecoder cannot decode this model: {reason}")
        self.model = model
        self.layers = list(model.model.layers[: model.config.num_hidden_layers])
        attn = self.layers[0].self_attn
        self.heads, self.kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
        self.head_dim = D = attn.head_dim
        # Q and K come out with each head's two halves interleaved ([x_0, x_h, x_1, x_h+1, ...]), so that
        # rotary embedding is one complex multiplication; q.k is unchanged when both are permuted alike.
        self.interleave_D = torch.arange(D).view(2, D // 2).t().reshape(D)
        self.qk_norms = (
            [self._qk_norm(layer.self_attn) for layer in self.layers]
            if type(model).__name__ in QK_NORM_MODEL_CLASSES
            else None
        )
        q_order, k_order = (
            (torch.arange(n)[:, None] * D + self.interleave_D).reshape(-1) for n in (self.heads, self.kv_heads)
        )
        with torch.no_grad():
            self.projections = [
                (
                    _Projection(
                        [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                        [q_order, k_order, None],
                    ),
                    _Projection([layer.self_attn.o_proj]),
                    _Projection([layer.mlp.gate_proj, layer.mlp.up_proj]),
                    _Projection([layer.mlp.down_proj]),
                )
                for layer in self.layers
            ]

    def _qk_norm(self, attn: Any) -> tuple[torch.Tensor, float]:
        """A layer's q and k norm weights in interleaved order, one row per Q then K head ``[H + KV, D]``, and
        their epsilon (one for both: :func:`fused_decode_refusal` checks)."""
        with torch.no_grad():
            q_D, k_D = (norm.weight.detach()[self.interleave_D] for norm in (attn.q_norm, attn.k_norm))
            weight = torch.cat([q_D.expand(self.heads, -1), k_D.expand(self.kv_heads, -1)])
        return weight, float(attn.q_norm.variance_epsilon)

    @classmethod
    def maybe(cls, model: PreTrainedModel) -> FusedDecoder | None:
        """A fused decoder for ``model``, or None when its forward must be used (see the module docstring)."""
        reason = fused_decode_refusal(model)
        if reason is not None:
            log_fallback_once(logger, f"fused decode not used: {reason}; decoding through the model's forward")
            return None
        return cls(model)

    def interleave_prompt_keys(self, prefix: SharedPrefix) -> None:
        """Put the prefilled prompt keys in the decoder's interleaved head-dim order (once per chunk)."""
        prefix.keys = [k.index_select(-1, self.interleave_D.to(k.device)) for k in prefix.keys]
        if torch.is_autocast_enabled("cpu"):
            # Under bf16 autocast the prefill leaves the keys in float32 (rotary runs in float32), and every decode
            # step's attention matmul would cast all of them again; cast once (the same bf16 numbers).
            dtype = torch.get_autocast_dtype("cpu")
            prefix.keys = [k.to(dtype) if k.device.type == "cpu" else k for k in prefix.keys]

    def pack(self, rows: int) -> None:
        """Prepare the projections for steps of ``rows`` rows (see :class:`_Projection`)."""
        for projections in self.projections:
            for projection in projections:
                projection.pack(rows)

    def step(
        self, tokens_B: torch.Tensor, position_B: torch.Tensor, prefix: SharedPrefix, cache_layers: list
    ) -> torch.Tensor:
        """Logits ``[B, V]`` for one new token per row; appends its keys/values to each ``cache_layers[i].update``."""
        inner = self.model.model
        B, H, KV, D = len(tokens_B), self.heads, self.kv_heads, self.head_dim
        hidden_BE = inner.embed_tokens(tokens_B[:, None])[:, 0]
        cos_B1D, sin_B1D = inner.rotary_emb(hidden_BE[:, None], position_B[:, None])  # [B, 1, D]
        half = D // 2
        # The model's q cos + rotate_half(q) sin pairs x_j with x_j+h at angle j (cos/sin repeat over the two
        # halves): on interleaved pairs that is (x_j + i x_j+h) (cos_j + i sin_j).
        rotation_B1h = torch.complex(cos_B1D[..., :half].float(), sin_B1D[..., :half].float())
        for i, (layer, (qkv, o, gate_up, down)) in enumerate(zip(self.layers, self.projections, strict=True)):
            attn, mlp = layer.self_attn, layer.mlp
            qkv_BX = qkv(rms_norm(layer.input_layernorm, hidden_BE))
            qk_BX = qkv_BX[:, : (H + KV) * D]
            if self.qk_norms is not None:
                qk_BX = head_rms_norm(qk_BX.view(B, H + KV, D), *self.qk_norms[i])
            pairs_BNh2 = qk_BX.view(B, H + KV, half, 2)
            qk_BND = torch.view_as_real(torch.view_as_complex(pairs_BNh2.float()) * rotation_B1h)
            qk_BND = qk_BND.view(B, H + KV, D).to(qkv_BX.dtype)  # no-ops in fp32
            keys, values = cache_layers[attn.layer_idx].update(
                qk_BND[:, H:, None], qkv_BX[:, (H + KV) * D :].view(B, KV, 1, D)
            )
            out_B1HD, _ = shared_prefix_attention(
                attn, qk_BND[:, :H, None], keys, values, None, scaling=attn.scaling, shared_prefix=prefix
            )
            hidden_BE = o(out_B1HD.reshape(B, H * D)).add_(hidden_BE)
            gate_up_BX = gate_up(rms_norm(layer.post_attention_layernorm, hidden_BE))
            inter = gate_up_BX.shape[1] // 2
            hidden_BE = down(mlp.act_fn(gate_up_BX[:, :inter]).mul_(gate_up_BX[:, inter:])).add_(hidden_BE)
        # lm_head sees [B, 1, E] as in the model's forward, so its hooks index the same shapes.
        return self.model.lm_head(rms_norm(inner.norm, hidden_BE)[:, None])[:, -1]
