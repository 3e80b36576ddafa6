"""Decode attention over a prompt KV cache shared by all samples of the prompt (docs/algorithm.md §8.1).

The ``n`` samples of one prompt attend to the same prompt keys/values. Copying them to
every sample row makes each decode step read the prompt cache ``n`` times, which is what
dominated decoding on aggregation prompts (~400 prompt tokens, 4 samples). Here attention
is split in two exact parts whose softmax sums are merged ("cascade" attention):

- prompt part: the queries of a prompt's samples are stacked into one block and attend
  to that prompt's keys once (``[P, kv_heads, rep * G, W]`` scores, G = most samples of a
  prompt still decoding);
- generated part: every sample row attends to its own generated keys (the cache rows).

Both parts subtract one score maximum m (the larger of the two parts' maxima, so every exp()
stays in range); with l_i the sum of exp(s - m) over part i and o_i the sum of exp(s - m) v,
``out = (o_1 + o_2) / (l_1 + l_2)``, which is exactly softmax attention over the concatenated keys.

The function is registered as an attention implementation named :data:`SHARED_PREFIX_ATTENTION`;
the engine selects it only around its decode loop and passes the :class:`SharedPrefix` as a
forward keyword argument, which transformers hands through to the attention function.
Without that argument it is plain sdpa.
"""

from __future__ import annotations

from typing import cast

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

SHARED_PREFIX_ATTENTION = "spiral_shared_prefix"


class SharedPrefix:
    """The distinct prompts' keys/values (per layer) and which decode rows read which prompt."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask_PW: torch.Tensor) -> None:
        self.keys, self.values = keys, values
        """Per layer ``[P, kv_heads, W, D]``, left-padded prompts."""
        self.mask_PW = mask_PW
        """Additive: 0 on prompt tokens, dtype min on left padding."""
        self.source_R = torch.zeros(0, dtype=torch.long)

    def set_rows(self, source_R: torch.Tensor) -> None:
        """Rows ``r`` decode prompt ``source_R[r]``; rows of one prompt are contiguous and in prompt order."""
        self.source_R = source_R
        P, R = self.mask_PW.shape[0], len(source_R)
        counts_P = torch.bincount(source_R, minlength=P)
        first_P = counts_P.cumsum(0) - counts_P
        self.group = max(int(counts_P.max()), 1)
        # Row r sits at (prompt, j) of a [P, G] grid; empty grid cells read row 0 and are never read back.
        self.cell_R = source_R * self.group + torch.arange(R, device=source_R.device) - first_P[source_R]
        self.row_of_cell = torch.zeros(P * self.group, dtype=torch.long, device=source_R.device)
        self.row_of_cell[self.cell_R] = torch.arange(R, device=source_R.device)
        # Every prompt has G rows (as in a fresh batch): the grid is the row order, no gathers needed.
        self.dense = P * self.group == R
        self.padded = bool((self.mask_PW != 0).any())
        """False when no remaining prompt has left padding: the mask add is skipped."""

    def keep(self, keep_B: torch.Tensor) -> None:
        """Keep decode rows ``keep_B``; drop prompts no row reads and left padding no prompt needs."""
        source_R = self.source_R[keep_B]
        used_P, source_R = torch.unique(source_R, return_inverse=True)
        start = int((self.mask_PW[used_P] != 0).sum(-1).min())
        if len(used_P) < self.mask_PW.shape[0]:
            self.keys = [k.index_select(0, used_P) for k in self.keys]
            self.values = [v.index_select(0, used_P) for v in self.values]
            self.mask_PW = self.mask_PW.index_select(0, used_P)
        self.keys = [k[:, :, start:] for k in self.keys]
        self.values = [v[:, :, start:] for v in self.values]
        self.mask_PW = self.mask_PW[:, start:]
        self.set_rows(source_R)


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    shared_prefix: SharedPrefix | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """One decode step: ``query [R, H, 1, D]``, this layer's generated ``key``/``value [R, kv_heads, t, D]``.

    Returns ``[R, 1, H, D]`` like the other attention implementations.
    """
    if shared_prefix is None or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    R, H, _, D = query.shape
    layer_idx = cast(int, module.layer_idx)  # an int on every transformers attention module
    prefix_k, prefix_v = shared_prefix.keys[layer_idx], shared_prefix.values[layer_idx]
    P, kv_heads, _, _ = prefix_k.shape
    rep, G, dense = H // kv_heads, shared_prefix.group, shared_prefix.dense

    def as_grid_rows(t: torch.Tensor) -> torch.Tensor:
        """Rows ``[R, kv_heads, rep, X]`` laid out as :func:`to_rows` returns them (a view)."""
        return t.view(P, G, kv_heads, rep, -1) if dense else t

    def to_rows(t: torch.Tensor) -> torch.Tensor:
        """Grid ``[P, kv_heads, rep * G, X]`` -> rows: ``[P, G, kv_heads, rep, X]`` (dense, a view) or ``[R, ...]``."""
        t = t.view(P, kv_heads, rep, G, -1).permute(0, 3, 1, 2, 4)
        return t if dense else t[shared_prefix.cell_R // G, shared_prefix.cell_R % G]

    def to_cells(t: torch.Tensor) -> torch.Tensor:
        """Rows ``[R, kv_heads, rep, X]`` -> grid ``[P, kv_heads, rep * G, X]``; empty cells copy row 0."""
        t = t if dense else t.index_select(0, shared_prefix.row_of_cell)
        return t.reshape(P, G, kv_heads, rep, -1).permute(0, 2, 3, 1, 4).reshape(P, kv_heads, rep * G, -1)

    q_RKrD = query.view(R, kv_heads, rep, D) * (scaling if scaling is not None else D**-0.5)
    # Scores in float32. Prompt part: a prompt's samples stacked as queries against its keys, read once.
    scores1 = torch.matmul(to_cells(q_RKrD), prefix_k.transpose(-1, -2)).float()  # [P, kv_heads, rep * G, W]
    if shared_prefix.padded:
        scores1 += shared_prefix.mask_PW[:, None, None, :]
    # Generated part: each row against its own keys.
    scores2 = torch.matmul(q_RKrD, key.transpose(-1, -2)).float()  # [R, kv_heads, rep, t]
    # One max over both parts keeps every exp() in range, so the parts' sums and outputs simply add up.
    top = torch.maximum(to_rows(scores1.amax(dim=-1, keepdim=True)), as_grid_rows(scores2.amax(dim=-1, keepdim=True)))
    top = top.reshape(R, kv_heads, rep, 1)
    weights1 = scores1.sub_(to_cells(top)).exp_()
    weights2 = scores2.sub_(top).exp_()
    out = as_grid_rows(torch.matmul(weights2.to(value.dtype), value).float())
    out += to_rows(torch.matmul(weights1.to(prefix_v.dtype), prefix_v).float())
    total = as_grid_rows(weights2.sum(dim=-1, keepdim=True)).add_(to_rows(weights1.sum(dim=-1, keepdim=True)))
    return out.div_(total).to(query.dtype).view(R, 1, H, D), None


AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)
