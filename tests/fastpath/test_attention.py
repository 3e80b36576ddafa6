"""fastpath/attention.py: shared-prompt (cascade) decode attention equals attention over the concatenated keys."""

from __future__ import annotations

import pytest
import torch

from spiral_lit.fastpath.attention import SharedPrefix, shared_prefix_attention


class _Layer(torch.nn.Module):
    layer_idx = 0


def _reference(query, prefix_k, prefix_v, mask_PW, source_R, gen_k, gen_v) -> torch.Tensor:
    """Each row: softmax attention over [its prompt's keys (padding masked) ; its own generated keys]."""
    rep = query.shape[1] // prefix_k.shape[1]
    keys = torch.cat([prefix_k[source_R], gen_k], dim=2).repeat_interleave(rep, dim=1)
    values = torch.cat([prefix_v[source_R], gen_v], dim=2).repeat_interleave(rep, dim=1)
    mask = torch.cat([mask_PW[source_R], torch.zeros(gen_k.shape[0], gen_k.shape[2])], dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=mask[:, None, None, :])
    return out.transpose(1, 2)  # [R, 1, H, D]


@pytest.mark.parametrize("kv_heads", [4, 2])  # multi-head and grouped-query attention
def test_shared_prefix_attention_equals_full_attention(kv_heads: int) -> None:
    g = torch.Generator().manual_seed(0)
    P, W, H, D, t = 3, 7, 4, 8, 5
    source_R = torch.tensor([0, 0, 0, 1, 2, 2])  # uneven groups: 3, 1 and 2 samples
    R = len(source_R)
    prefix_k, prefix_v = torch.randn(P, kv_heads, W, D, generator=g), torch.randn(P, kv_heads, W, D, generator=g)
    pads = torch.tensor([0, 3, 5])  # left padding of each prompt
    mask_PW = torch.zeros(P, W).masked_fill(torch.arange(W)[None, :] < pads[:, None], torch.finfo(torch.float32).min)
    gen_k, gen_v = torch.randn(R, kv_heads, t, D, generator=g), torch.randn(R, kv_heads, t, D, generator=g)
    query = torch.randn(R, H, 1, D, generator=g)

    prefix = SharedPrefix([prefix_k], [prefix_v], mask_PW)
    prefix.set_rows(source_R)
    out, _ = shared_prefix_attention(_Layer(), query, gen_k, gen_v, None, shared_prefix=prefix)
    want = _reference(query, prefix_k, prefix_v, mask_PW, source_R, gen_k, gen_v)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)

    # Rows 1, 2 (prompt 0) and 3 (prompt 1) finish: prompt 1 has no row left.
    keep_B = torch.tensor([0, 4, 5])
    prefix.keep(keep_B)
    assert prefix.keys[0].shape[0] == 2  # prompt 1 dropped
    assert prefix.mask_PW.shape[1] == W  # prompt 0 has no padding, so none can be cut
    out, _ = shared_prefix_attention(_Layer(), query[keep_B], gen_k[keep_B], gen_v[keep_B], None, shared_prefix=prefix)
    want = _reference(query, prefix_k, prefix_v, mask_PW, source_R, gen_k, gen_v)[keep_B]
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)

    prefix.keep(torch.tensor([1, 2]))  # only prompt 2 (5 pads) is left: its padding is cut
    assert prefix.mask_PW.shape == (1, W - 5)
    out, _ = shared_prefix_attention(_Layer(), query[4:], gen_k[4:], gen_v[4:], None, shared_prefix=prefix)
    torch.testing.assert_close(out, want[1:], atol=1e-6, rtol=1e-5)


def test_without_a_shared_prefix_it_is_sdpa() -> None:
    g = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(2, 4, 3, 8, generator=g) for _ in range(3))
    out, _ = shared_prefix_attention(_Layer(), query, key, value, None, scaling=8**-0.5)
    want = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("pads", [(0, 0, 0), (0, 2, 4)])
def test_equal_groups_take_the_gather_free_path(pads: tuple[int, ...]) -> None:
    """Every prompt with as many rows (a fresh batch): rows are the grid, no gathers; without padding, no mask."""
    g = torch.Generator().manual_seed(2)
    P, W, H, kv_heads, D, t = 3, 6, 4, 2, 8, 3
    source_R = torch.tensor([0, 0, 1, 1, 2, 2])
    prefix_k, prefix_v = torch.randn(P, kv_heads, W, D, generator=g), torch.randn(P, kv_heads, W, D, generator=g)
    mask_PW = torch.zeros(P, W).masked_fill(
        torch.arange(W)[None, :] < torch.tensor(pads)[:, None], torch.finfo(torch.float32).min
    )
    gen_k, gen_v = torch.randn(6, kv_heads, t, D, generator=g), torch.randn(6, kv_heads, t, D, generator=g)
    query = torch.randn(6, H, 1, D, generator=g)
    prefix = SharedPrefix([prefix_k], [prefix_v], mask_PW)
    prefix.set_rows(source_R)
    assert prefix.dense
    assert prefix.padded == any(pads)
    out, _ = shared_prefix_attention(_Layer(), query, gen_k, gen_v, None, shared_prefix=prefix)
    want = _reference(query, prefix_k, prefix_v, mask_PW, source_R, gen_k, gen_v)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-5)
