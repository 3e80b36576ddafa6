"""Drawing the aggregation sets of a SPIRAL rollout (docs/algorithm.md §2.2).

For each prompt, ``n_sets`` *distinct* unordered subsets of size ``set_size`` are drawn
uniformly, without replacement, from all C(n_search, set_size) subsets of the search
traces. A trace may land in several sets or in none.

Two exact samplers share the work:

- enumeration (list all subsets, take a random permutation prefix) when C is small or
  ``n_sets`` is a large fraction of C, so that rejection would waste draws;
- rejection (draw a uniform random subset with ``torch.randperm``, keep it if new) when
  C is huge (e.g. C(64, 8) ~ 4.4e9), where enumeration is impossible and collisions rare.

Both give every ordered sequence of distinct subsets the same probability: a rejection
draw conditioned on being new is uniform over the subsets not yet taken.
"""

from __future__ import annotations

import itertools
import math

import torch

_ENUMERATE_MAX_SUBSETS = 4096
"""Enumerate all subsets when C(n_search, set_size) is at most this (cheap, no rejection)."""


def _check_counts(n_search: int, n_sets: int, set_size: int) -> int:
    """Validate the counts and return C(n_search, set_size)."""
    if n_search < 1 or n_sets < 1 or set_size < 1:
        raise ValueError(f"n_search={n_search}, n_sets={n_sets} and set_size={set_size} must all be >= 1")
    if set_size > n_search:
        raise ValueError(f"set_size={set_size} must be <= n_search={n_search} (a set holds distinct search traces)")
    n_subsets = math.comb(n_search, set_size)
    if n_sets > n_subsets:
        raise ValueError(
            f"n_sets={n_sets} distinct sets are asked for, but only C(n_search={n_search}, "
            f"set_size={set_size}) = {n_subsets} exist; use n_sets <= {n_subsets}"
        )
    return n_subsets


def _sample_sets_enumerate(
    n_search: int, n_sets: int, set_size: int, generator: torch.Generator | None
) -> torch.Tensor:
    """All subsets (lexicographic, so each row is sorted), then a uniform random prefix of a permutation."""
    all_sets_CS = torch.tensor(list(itertools.combinations(range(n_search), set_size)), dtype=torch.long)
    pick_K = torch.randperm(all_sets_CS.shape[0], generator=generator)[:n_sets]
    return all_sets_CS[pick_K]


def _sample_sets_rejection(
    n_search: int, n_sets: int, set_size: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Uniform random subsets via ``randperm``, rejecting repeats until ``n_sets`` distinct ones."""
    seen: set[tuple[int, ...]] = set()
    chosen: list[tuple[int, ...]] = []
    while len(chosen) < n_sets:
        subset = tuple(sorted(torch.randperm(n_search, generator=generator)[:set_size].tolist()))
        if subset not in seen:
            seen.add(subset)
            chosen.append(subset)
    return torch.tensor(chosen, dtype=torch.long)


def sample_sets(n_search: int, n_sets: int, set_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``n_sets`` distinct subsets of ``range(n_search)``, uniformly without replacement.

    Returns a LongTensor ``[n_sets, set_size]``, indices ascending within each set (the set
    is unordered; candidate order in the aggregation prompt is shuffled elsewhere,
    docs/algorithm.md §1.2). Raises ``ValueError`` for a count < 1, ``set_size > n_search`` or
    ``n_sets > C(n_search, set_size)``.
    """
    n_subsets = _check_counts(n_search, n_sets, set_size)
    # Rejection needs ~C/(C - n_sets) draws per set; enumerating is cheaper once n_sets > C/2.
    if n_subsets <= _ENUMERATE_MAX_SUBSETS or 2 * n_sets > n_subsets:
        return _sample_sets_enumerate(n_search, n_sets, set_size, generator)
    return _sample_sets_rejection(n_search, n_sets, set_size, generator)


def sample_sets_batch(
    batch: int, n_search: int, n_sets: int, set_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Independent :func:`sample_sets` draws for ``batch`` prompts: LongTensor ``[B, K, S]``."""
    if batch < 1:
        raise ValueError(f"batch={batch} must be >= 1")
    return torch.stack([sample_sets(n_search, n_sets, set_size, generator) for _ in range(batch)])


def sample_member_sets(
    n_members: int, population: int, set_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Recursive self-aggregation's sets (docs/algorithm.md §7.5): LongTensor ``[n_members, set_size]``.

    Each new member draws its own uniformly random ``set_size``-subset of ``range(population)``
    (indices ascending), independently of the others: unlike :func:`sample_sets`, two members
    may read the same set, as in RSA, where K-subsets of N are drawn with replacement across members.
    """
    if n_members < 1 or population < 1 or not 1 <= set_size <= population:
        raise ValueError(
            f"n_members={n_members}, population={population} must be >= 1 and set_size={set_size} in [1, population]"
        )
    # argsort of iid uniforms is a uniform random permutation per row; its first set_size entries a uniform subset.
    order_MP = torch.rand((n_members, population), generator=generator).argsort(dim=-1)
    return order_MP[:, :set_size].sort(dim=-1).values
