"""Per-role loss normalisers and gradient norms, on hand-computed values."""

from __future__ import annotations

import pytest
import torch

from spiral_lit.algorithms.roles import role_grad_sq_norms, role_normalisers

TOKENS_R = torch.tensor([6.0, 12.0])  # search, aggregation
SEQUENCES_R = torch.tensor([2.0, 3.0])


@pytest.mark.parametrize(
    ("reduction", "mode", "expected"),
    [
        ("token_mean", "shared", [18.0, 18.0]),  # one mean over all 18 tokens
        ("token_mean", "per_role", [6.0, 12.0]),  # each role over its own tokens
        ("seq_mean_token_sum_norm", "shared", [20.0, 20.0]),  # 5 sequences x norm_const 4
        ("seq_mean_token_sum_norm", "per_role", [8.0, 12.0]),
    ],
)
def test_role_normalisers(reduction: str, mode: str, expected: list[float]) -> None:
    assert role_normalisers(TOKENS_R, SEQUENCES_R, reduction, 4.0, mode).tolist() == expected


def test_empty_roles_give_one_not_zero() -> None:
    zero_R = torch.zeros(2)
    assert role_normalisers(torch.tensor([5.0, 0.0]), zero_R, "token_mean", None, "per_role").tolist() == [5.0, 1.0]
    assert role_normalisers(zero_R, zero_R, "token_mean", None, "shared").tolist() == [1.0, 1.0]


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="norm_const"):
        role_normalisers(TOKENS_R, SEQUENCES_R, "seq_mean_token_sum_norm", None, "shared")
    with pytest.raises(ValueError, match="per_role"):
        role_normalisers(TOKENS_R, SEQUENCES_R, "token_mean", None, "both")


def test_role_grad_sq_norms() -> None:
    # Search gradient (3, 0) and (1,); total (3, 4) and (1,): aggregation is (0, 4) and (0,).
    search = [torch.tensor([3.0, 0.0]), torch.tensor([1.0])]
    total = [torch.tensor([3.0, 4.0]), torch.tensor([1.0])]
    assert role_grad_sq_norms(search, total).tolist() == [10.0, 16.0, 26.0]
