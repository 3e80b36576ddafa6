"""fastpath/layers.py: the norms the fast paths compute themselves equal the models' own modules."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from spiral_lit.fastpath.layers import head_rms_norm, rms_norm


def _norm(dim: int, dtype: torch.dtype) -> Qwen3RMSNorm:
    norm = Qwen3RMSNorm(dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(0)) + 1)
    return norm.to(dtype)


def test_qwen3_rms_norm_runs_as_f_rms_norm_bitwise() -> None:
    norm = _norm(16, torch.float32)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rms_norm(norm, x), norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_rms_norm_on_permuted_heads_equals_the_module_permuted(dtype: torch.dtype) -> None:
    """Heads whose dims come interleaved, normed with the weight permuted alike: the module's output, permuted."""
    D = 16
    norm = _norm(D, dtype)
    x_NHD = (3 * torch.randn(7, 4, D, generator=torch.Generator().manual_seed(2))).to(dtype)
    order_D = torch.arange(D).view(2, D // 2).t().reshape(D)
    with torch.no_grad():
        want = norm(x_NHD)[..., order_D]
        got = head_rms_norm(x_NHD[..., order_D], norm.weight[order_D], norm.variance_epsilon)
        stacked = head_rms_norm(x_NHD[..., order_D], norm.weight[order_D].expand(4, D), norm.variance_epsilon)
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 0.02, "rtol": 0.01}
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(stacked, got, atol=0, rtol=0)
    assert got.dtype == dtype
    unpermuted = head_rms_norm(x_NHD[..., order_D], norm.weight, norm.variance_epsilon)
    assert (unpermuted.float() - want.float()).abs().max() > 0.1
