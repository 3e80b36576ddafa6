"""Compositions of the three compute primitives over one rollout engine.

- parallel search: ``n`` independent traces per problem;
- aggregation: one prompt per set of earlier traces, ``n_agg`` traces per prompt;
- recursive self-aggregation (RSA, docs/algorithm.md §7.5): rounds of aggregation, each new
  population member reading a random subset of the previous population.

Used by training (the SPIRAL rollout, docs/algorithm.md §2) and evaluation alike, so the
two never drift apart. Seeds are derived from (seed, phase) by the caller, with the seed functions below (every
seed of the package is derived here). Training passes one seed per call (:func:`step_seed`); evaluation passes
one seed per problem (derived from the problem's uid with :func:`derive_seed`), so that a problem's rollouts,
candidate orders and RSA sets do not depend on which batch or rank it lands in (docs/algorithm.md §7.1).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from spiral_lit.algorithms import sample_member_sets
from spiral_lit.prompts import PromptRenderer
from spiral_lit.rollout.base import Completion, RolloutEngine, SamplingConfig, Seed
from spiral_lit.tasks.base import Problem


def derive_seed(*parts: object) -> int:
    """The seed of the draw that ``parts`` name: 63 bits of a digest of the parts joined by ``/``, the same in every
    process and run (every evaluation seed, and the scaffolds' per-problem draws; docs/algorithm.md §7.1).

    Python's ``hash()`` of a str is salted per process (PYTHONHASHSEED), so two DDP ranks would
    disagree; a cryptographic digest does not.
    """
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def derive_rng(*parts: object) -> random.Random:
    """A Python RNG for the draw that ``parts`` name, seeded with the parts joined by ``/`` (Python seeds a str
    through SHA-512, the same in every process): candidate orders, the warm start's examples, the data order."""
    return random.Random("/".join(map(str, parts)))


def step_seed(seed: int, batch: int, rank: int, phase: int) -> int:
    """The seed of a training step's ``phase`` (1 search, 2 sets, 3 aggregation, 6 update order) on ``rank``, from
    the run's ``seed`` and the rollout ``batch``: Python's hash of the int tuple (ints are not salted, so every
    process agrees), mod 2**31 (docs/algorithm.md §2.5). Kept as it was: another derivation would change every
    run's draws."""
    return hash((seed, batch, rank, phase)) % (2**31)


@dataclass
class SearchRollout:
    """``n`` search traces per problem."""

    prompts: list[list[int]]
    """[B] search prompt ids."""
    traces: list[list[Completion]]
    """[B][n]."""


@dataclass
class AggregationRollout:
    """``n_agg`` aggregation traces for each of the K sets of each problem."""

    sets_BKS: torch.Tensor
    """[B, K, S] indices into the problem's search traces."""
    prompts: list[list[list[int]]]
    """[B][K] aggregation prompt ids."""
    traces: list[list[list[Completion]]]
    """[B][K][n_agg]."""
    shown: list[list[list[str]]] = field(default_factory=list)
    """[B][K][S] the candidates' texts as each prompt shows them, in the order shown (empty: not recorded)."""


def sample_search(
    engine: RolloutEngine,
    renderer: PromptRenderer,
    problems: list[Problem],
    n: int,
    sampling: SamplingConfig,
    seed: Seed,
) -> SearchRollout:
    """``n`` search traces per problem; ``seed``: one for the call, or one per problem."""
    prompts = [renderer.search(p) for p in problems]
    return SearchRollout(prompts, engine.generate(prompts, n, sampling, seed))


def _shown(renderer: PromptRenderer, candidate: Completion) -> str:
    """How an earlier trace is shown as a candidate: a candidate kept by reference as it was shown (already cut),
    any other trace through the renderer's cut (docs/algorithm.md §6.4)."""
    return candidate.selected if candidate.selected is not None else renderer.truncate_candidate(candidate.token_ids)


def sample_aggregations(
    engine: RolloutEngine,
    renderer: PromptRenderer,
    problems: list[Problem],
    candidates: list[list[Completion]],
    sets_BKS: torch.Tensor,
    n_agg: int,
    sampling: SamplingConfig,
    seed: Seed,
) -> AggregationRollout:
    """One aggregation prompt per set (problem + its candidates), ``n_agg`` samples each.

    ``seed``: one for the call (candidate order seeded per (seed, batch position, set)), or one
    per problem (candidate order and sampling seeded per (problem seed, set), whatever the batch).
    """
    B, K, _ = sets_BKS.shape

    def order_rng(b: int, k: int) -> random.Random:
        return derive_rng(seed[b], k) if isinstance(seed, list) else derive_rng(seed, b, k)

    shown: list[list[str]] = []  # [B * K][S] candidate texts in the order shown
    for b in range(B):
        for k in range(K):
            members = [candidates[b][int(i)] for i in sets_BKS[b, k]]
            order = renderer.candidate_order(len(members), order_rng(b, k))
            shown.append([_shown(renderer, members[i]) for i in order])
    prompts = [[renderer.aggregation_shown(problems[b], shown[b * K + k]) for k in range(K)] for b in range(B)]
    engine_seed: Seed = seed
    if isinstance(seed, list):
        engine_seed = [derive_seed(seed[b], "set", k) for b in range(B) for k in range(K)]
    flat = engine.generate([p for per_problem in prompts for p in per_problem], n_agg, sampling, engine_seed)
    for shown_S, traces_A in zip(shown, flat, strict=True):
        for trace in traces_A:
            trace.selected = renderer.selection(trace.text, shown_S)
    traces = [flat[b * K : (b + 1) * K] for b in range(B)]
    return AggregationRollout(sets_BKS, prompts, traces, [shown[b * K : (b + 1) * K] for b in range(B)])


def recursive_aggregation(
    engine: RolloutEngine,
    renderer: PromptRenderer,
    problems: list[Problem],
    population: list[list[Completion]],
    rounds: int,
    set_size: int,
    sampling: SamplingConfig,
    seeds: list[int],
    on_round: Callable[[int], None] | None = None,
) -> list[AggregationRollout]:
    """RSA (docs/algorithm.md §7.5): ``rounds`` rounds over the initial ``population`` ``[B][N]``; ``on_round(t)``
    is called as round t starts (progress lines).

    In round t each of the N new members aggregates its own uniformly random ``set_size``-subset
    of the population of round t - 1 (one aggregation trace per member). Returns one rollout per
    round, ``sets_BKS`` ``[B, N, set_size]`` and ``traces`` ``[B][N][1]``; round t's population is
    ``[[s[0] for s in per_problem] for per_problem in rounds[t - 1].traces]``. ``seeds``: one per problem.
    """
    out: list[AggregationRollout] = []
    for t in range(1, rounds + 1):
        if on_round is not None:
            on_round(t)
        N = len(population[0])
        generators = [torch.Generator().manual_seed(derive_seed(s, "rsa_sets", t)) for s in seeds]
        sets_BNK = torch.stack([sample_member_sets(N, N, set_size, g) for g in generators])
        round_seeds = [derive_seed(s, "rsa", t) for s in seeds]
        agg = sample_aggregations(engine, renderer, problems, population, sets_BNK, 1, sampling, round_seeds)
        out.append(agg)
        population = [[per_set[0] for per_set in per_problem] for per_problem in agg.traces]
    return out
