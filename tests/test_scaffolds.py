"""scaffolds.py's seed functions: every seed of the package is derived there, and the integers are pinned, since a
changed derivation would silently change every run's draws."""

from __future__ import annotations

import random

from spiral_lit.scaffolds import derive_rng, derive_seed, step_seed


def test_seeds_are_the_pinned_integers() -> None:
    assert derive_seed(1234, "heldout/0") == 5492275955718944106  # eval.seed, problem uid
    assert derive_seed(7, "search") == 6197293981575524182
    assert step_seed(0, 3, 1, 2) == 1380060875  # seed, rollout batch, rank, phase
    assert step_seed(42, 0, 0, 6) == 575801584
    assert 0 <= derive_seed("any", 1) < 2**63 and 0 <= step_seed(9, 9, 9, 9) < 2**31


def test_python_rngs_are_seeded_with_the_joined_parts() -> None:
    assert derive_rng(0, "epoch", 1).random() == random.Random("0/epoch/1").random() == 0.8696657112182762
    assert derive_rng(3, 1, 0).random() != derive_rng(3, 0, 1).random()
