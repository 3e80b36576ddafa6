"""Set sampling (docs/algorithm.md §2.2): distinct, sorted, uniform without replacement."""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter

import pytest
import torch

from spiral_lit.algorithms import sample_member_sets, sample_sets, sample_sets_batch
from spiral_lit.algorithms.sets import _sample_sets_enumerate, _sample_sets_rejection

SAMPLERS = [_sample_sets_enumerate, _sample_sets_rejection]


def _assert_valid(sets_KS: torch.Tensor, n_search: int, n_sets: int, set_size: int) -> None:
    assert sets_KS.dtype == torch.long
    assert sets_KS.shape == (n_sets, set_size)
    assert int(sets_KS.min()) >= 0 and int(sets_KS.max()) < n_search
    rows = [tuple(row) for row in sets_KS.tolist()]
    for row in rows:
        assert list(row) == sorted(set(row)), f"set {row} must be sorted with distinct members"
    assert len(set(rows)) == n_sets, "sets must be distinct"


@pytest.mark.parametrize(
    ("n_search", "n_sets", "set_size"),
    [(8, 4, 4), (8, 70, 4), (5, 1, 5), (1, 1, 1), (6, 15, 2), (64, 16, 8), (64, 2000, 8), (100, 3, 1)],
)
def test_sample_sets_shape_sorted_distinct(n_search: int, n_sets: int, set_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    _assert_valid(sample_sets(n_search, n_sets, set_size, gen), n_search, n_sets, set_size)


def test_all_subsets_when_n_sets_equals_c() -> None:
    sets_KS = sample_sets(8, 70, 4, torch.Generator().manual_seed(1))
    assert {tuple(r) for r in sets_KS.tolist()} == set(itertools.combinations(range(8), 4))


def test_huge_c_is_fast() -> None:
    # C(64, 8) ~ 4.4e9 subsets: enumerating them would never finish; rejection must.
    start = time.perf_counter()
    sets_BKS = sample_sets_batch(32, 64, 16, 8, torch.Generator().manual_seed(0))
    assert time.perf_counter() - start < 2.0
    assert sets_BKS.shape == (32, 16, 8)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_marginal_frequencies_uniform(sampler) -> None:
    # n_search=5, set_size=2, n_sets=3: each of the C(5,2)=10 subsets is in a draw with
    # probability 3/10, so its count over 20k draws is Binomial(20000, 0.3): mean 6000,
    # sd = sqrt(20000 * 0.3 * 0.7) = 64.8. A 5-sigma bound (324) fails a correct sampler with
    # probability ~6e-7 per subset, and would catch a bias of 1.6% of the mean.
    gen = torch.Generator().manual_seed(1234)
    n_draws, n_sets, n_subsets = 20_000, 3, math.comb(5, 2)
    subset_counts: Counter[tuple[int, ...]] = Counter()
    collection_counts: Counter[frozenset[tuple[int, ...]]] = Counter()
    for _ in range(n_draws):
        rows = [tuple(r) for r in sampler(5, n_sets, 2, gen).tolist()]
        subset_counts.update(rows)
        collection_counts[frozenset(rows)] += 1
    assert set(subset_counts) == set(itertools.combinations(range(5), 2))
    mean = n_draws * n_sets / n_subsets
    sd = math.sqrt(n_draws * (n_sets / n_subsets) * (1 - n_sets / n_subsets))
    for subset, count in subset_counts.items():
        assert abs(count - mean) < 5 * sd, (subset, count, mean)
    # Jointly, the unordered collection of 3 sets is uniform over C(10, 3) = 120 collections.
    # Pearson chi-square with 119 dof; 207.2 is its upper 1e-6 quantile (scipy.stats.chi2.isf).
    n_collections = math.comb(n_subsets, n_sets)
    assert len(collection_counts) == n_collections
    expected = n_draws / n_collections
    chi_square = sum((c - expected) ** 2 / expected for c in collection_counts.values())
    assert chi_square < 207.2


def test_paper_defaults_trace_in_no_set_rate() -> None:
    # docs/algorithm.md §2.2: with 8 traces, 4 sets of 4, a trace is in no set with probability
    # C(35, 4) / C(70, 4) = 0.0571 (35 of the 70 subsets exclude it). Over 10k draws the count
    # for trace 0 is Binomial(10000, 0.0571): mean 571, sd 23.2; allow 5 sd.
    gen = torch.Generator().manual_seed(7)
    p = math.comb(35, 4) / math.comb(70, 4)
    n_draws = 10_000
    misses = sum(int(not (sample_sets(8, 4, 4, gen) == 0).any()) for _ in range(n_draws))
    assert abs(misses - n_draws * p) < 5 * math.sqrt(n_draws * p * (1 - p))


@pytest.mark.parametrize(("n_search", "n_sets", "set_size"), [(8, 4, 4), (64, 16, 8)])
def test_deterministic_with_seeded_generator(n_search: int, n_sets: int, set_size: int) -> None:
    first = sample_sets(n_search, n_sets, set_size, torch.Generator().manual_seed(42))
    again = sample_sets(n_search, n_sets, set_size, torch.Generator().manual_seed(42))
    other = sample_sets(n_search, n_sets, set_size, torch.Generator().manual_seed(43))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_batch_rows_are_independent_draws() -> None:
    sets_BKS = sample_sets_batch(3, 8, 4, 4, torch.Generator().manual_seed(0))
    assert sets_BKS.shape == (3, 4, 4)
    gen = torch.Generator().manual_seed(0)
    for sets_KS in sets_BKS:
        assert torch.equal(sets_KS, sample_sets(8, 4, 4, gen))


@pytest.mark.parametrize(
    ("n_search", "n_sets", "set_size", "match"),
    [
        (8, 71, 4, "n_sets=71.*C\\(n_search=8, set_size=4\\) = 70"),
        (4, 1, 5, "set_size=5 must be <= n_search=4"),
        (0, 1, 1, "must all be >= 1"),
        (8, 0, 4, "must all be >= 1"),
        (8, 4, 0, "must all be >= 1"),
        (8, -1, 4, "must all be >= 1"),
    ],
)
def test_sample_sets_errors(n_search: int, n_sets: int, set_size: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sample_sets(n_search, n_sets, set_size)


def test_sample_sets_batch_rejects_empty_batch() -> None:
    with pytest.raises(ValueError, match="batch=0"):
        sample_sets_batch(0, 8, 4, 4)


def test_member_sets_are_independent_uniform_subsets() -> None:
    """RSA (docs/algorithm.md §7.5): each member reads its own uniform K-subset; members may share one."""
    generator = torch.Generator().manual_seed(0)
    sets_MK = sample_member_sets(20000, 4, 2, generator)
    assert sets_MK.shape == (20000, 2) and sets_MK.dtype == torch.long
    assert bool((sets_MK[:, 0] < sets_MK[:, 1]).all())  # distinct members within a set, ascending
    counts = Counter(map(tuple, sets_MK.tolist()))
    assert set(counts) == set(itertools.combinations(range(4), 2))  # repeats across members are allowed
    assert all(abs(c / 20000 - 1 / 6) < 0.015 for c in counts.values())  # uniform over the C(4, 2) = 6 subsets
    again = sample_member_sets(20000, 4, 2, torch.Generator().manual_seed(0))
    assert torch.equal(sets_MK, again)


def test_member_sets_of_the_whole_population_and_bad_sizes() -> None:
    assert sample_member_sets(3, 4, 4).tolist() == [[0, 1, 2, 3]] * 3
    for args in [(0, 4, 2), (2, 4, 5), (2, 4, 0)]:
        with pytest.raises(ValueError, match="set_size"):
            sample_member_sets(*args)
