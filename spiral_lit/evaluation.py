"""Held-out evaluation of the primitives: parallel search and one aggregation round.

Per problem: ``n_samples`` search traces (pass@1, pass@k, majority vote), then
``n_agg`` aggregations of the set made of the first ``set_size`` traces: the
"aggregated answer" accuracy that SPIRAL training is meant to raise (issue 3).
Returns per-problem tensors; the LightningModule averages them with torchmetrics so
several ranks sum correctly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from spiral_lit.metrics import majority_vote, pass_at_k
from spiral_lit.prompts import PromptRenderer
from spiral_lit.rollout.base import RolloutEngine, SamplingConfig
from spiral_lit.scaffolds import sample_aggregations, sample_search
from spiral_lit.tasks.base import Problem
from spiral_lit.tasks.verify import Verifier


@dataclass
class EvalConfig:
    """What validation/test measures on the held-out split."""

    n_samples: int = 8
    """Search traces per problem (pass@k and majority vote use all of them)."""
    pass_k: list[int] = field(default_factory=lambda: [1, 8])
    """k values of the unbiased pass@k estimator (each <= n_samples)."""
    set_size: int = 4
    """Candidates in the evaluated aggregation set (the first set_size search traces); 0 skips aggregation."""
    n_agg: int = 1
    """Aggregation traces per problem."""
    seed: int = 1234
    """Evaluation sampling seed (the same for every checkpoint, so comparisons are paired)."""

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"eval.n_samples must be >= 1, got {self.n_samples}")
        if any(k < 1 or k > self.n_samples for k in self.pass_k):
            raise ValueError(f"eval.pass_k values must be in [1, eval.n_samples={self.n_samples}], got {self.pass_k}")
        if not 0 <= self.set_size <= self.n_samples:
            raise ValueError(f"eval.set_size must be in [0, eval.n_samples={self.n_samples}], got {self.set_size}")
        if self.set_size and self.n_agg < 1:
            raise ValueError(f"eval.n_agg must be >= 1 when eval.set_size > 0, got {self.n_agg}")


def evaluate_problems(
    engine: RolloutEngine,
    renderer: PromptRenderer,
    verifier: Verifier,
    problems: list[Problem],
    config: EvalConfig,
    search_sampling: SamplingConfig,
    aggregation_sampling: SamplingConfig,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Per-problem metric values ``{name: [B]}``."""
    n = config.n_samples
    search = sample_search(engine, renderer, problems, n, search_sampling, seed)
    flat = [t for traces in search.traces for t in traces]
    result = verifier.score([p for p in problems for _ in range(n)], [t.text for t in flat])
    correct_BN = torch.tensor(result.rewards).view(len(problems), n) >= 1.0
    answers = [result.extracted[b * n : (b + 1) * n] for b in range(len(problems))]
    out: dict[str, torch.Tensor] = {}
    counts = correct_BN.sum(1).tolist()
    for k in config.pass_k:
        out[f"search/pass@{k}"] = torch.tensor([pass_at_k(n, c, k) for c in counts])
    votes = [majority_vote(a) for a in answers]
    out[f"search/maj@{n}"] = torch.tensor(
        [float(v is not None and c[a.index(v)]) for v, a, c in zip(votes, answers, correct_BN.tolist(), strict=True)]
    )
    out["search/tokens"] = torch.tensor([float(sum(t.num_tokens for t in ts)) / n for ts in search.traces])
    if config.set_size:
        sets_BKS = torch.arange(config.set_size).expand(len(problems), 1, config.set_size)
        agg = sample_aggregations(
            engine, renderer, problems, search.traces, sets_BKS, config.n_agg, aggregation_sampling, seed + 1
        )
        agg_traces = [t for per_problem in agg.traces for t in per_problem[0]]
        agg_result = verifier.score([p for p in problems for _ in range(config.n_agg)], [t.text for t in agg_traces])
        agg_correct = torch.tensor(agg_result.rewards).view(len(problems), config.n_agg) >= 1.0
        out["aggregation/accuracy"] = agg_correct.float().mean(1)
        out["aggregation/set_oracle"] = correct_BN[:, : config.set_size].any(1).float()
        out["aggregation/tokens"] = torch.tensor(
            [sum(t.num_tokens for t in per_problem[0]) / config.n_agg for per_problem in agg.traces], dtype=torch.float
        )
        out["aggregation/prompt_tokens"] = torch.tensor([float(len(p[0])) for p in agg.prompts])
    return out
