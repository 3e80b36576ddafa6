"""Aggregate the same candidates with several aggregators, so that their audits are compared on equal sets.

    python experiments/task_probes/cross_aggregate.py --candidates runs/quickstart/warmstart/hf \
        --aggregators runs/quickstart/warmstart/hf runs/probe_vt/warmstart/hf:verdict_target

The quickstart's countdown task and sampling (``experiments/quickstart/compare.yaml``): per held-out problem, 4
search traces from ``--candidates``, then 4 aggregations of that set by each aggregator (``path`` or
``path:verdict_target`` for one trained with target verdicts), with the same seeds. Prints the aggregation
accuracy, by number of right candidates, and the audit metrics (docs/algorithm.md §7.4), plus how many of the
wrong candidates called right had a verdict line whose own arithmetic is correct, and how many recomputed the
candidate's own operations (the task's verdict's steps) rather than other ones, and how often a kept candidate
is one the aggregation's own verdict called right.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
import yaml

from spiral_lit import SpiralModule
from spiral_lit.evaluation.held_out import score_traces
from spiral_lit.evaluation.metrics import says_right, verdict_agreement
from spiral_lit.prompts import PromptConfig, audit_verdicts, kept_candidate
from spiral_lit.rollout.base import SamplingConfig
from spiral_lit.runtime.models import PolicyConfig
from spiral_lit.runtime.policy import VerifierConfig
from spiral_lit.scaffolds import derive_seed, sample_aggregations, sample_search
from spiral_lit.tasks import CountdownTask

STEP = re.compile(r"(-?\d+)([+-])(\d+)=(-?\d+)")
COMPARE = Path(__file__).resolve().parents[1] / "quickstart" / "compare.yaml"


def load(path: str, verdict_target: bool) -> tuple[SpiralModule, CountdownTask]:
    """The checkpoint at ``path`` with the quickstart's evaluation settings (``compare.yaml``: task, prompts,
    sampling), target verdicts switched on or off."""
    config = yaml.safe_load(COMPARE.read_text())
    model = config["model"]["init_args"]
    task = CountdownTask(**config["data"]["task"]["init_args"], verdict_target=verdict_target)
    module = SpiralModule(
        PolicyConfig(path), task=task, prompts=PromptConfig(**model["prompts"]),
        search_sampling=SamplingConfig(**model["search_sampling"]),
        aggregation_sampling=SamplingConfig(**model["aggregation_sampling"]),
        verifier=VerifierConfig(num_workers=0),
    )  # fmt: skip
    module.configure_model()
    return module, task


def arithmetic_holds(line: str) -> bool:
    """Whether every ``a+b=c`` / ``a-b=c`` step written in a verdict line is correct."""
    return all((int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c) for a, op, b, c in STEP.findall(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", required=True)
    parser.add_argument("--aggregators", nargs="+", required=True)
    parser.add_argument("--problems", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    searcher, task = load(args.candidates, False)
    problems = [task.problem(i, "heldout") for i in range(args.problems)]
    seeds = [derive_seed(0, p.uid) for p in problems]
    sampler = searcher.runtime.sampler
    search = sample_search(
        sampler.engine,
        sampler.renderer,
        problems,
        4,
        searcher.search_sampling,
        [derive_seed(s, "search") for s in seeds],
    )
    n_right = score_traces(sampler.verifier, problems, search.traces).correct_BN.sum(1).tolist()
    print(f"candidates from {args.candidates}: pass@1 {sum(n_right) / (4 * len(problems)):.3f}")
    sets = torch.arange(4).expand(len(problems), 1, 4)
    for spec in args.aggregators:
        path, _, flag = spec.partition(":")
        module, atask = load(path, flag == "verdict_target")
        s = module.runtime.sampler
        agg = sample_aggregations(
            s.engine, s.renderer, problems, search.traces, sets, 4, module.aggregation_sampling,
            [derive_seed(x, "aggregation") for x in seeds],
        )  # fmt: skip
        by_right: dict[int, list[bool]] = {}
        rates: list[tuple[float, float, float]] = []
        misjudged = misjudged_sound = misjudged_faithful = keeps = keeps_judged_right = 0
        correct_BA = score_traces(s.verifier, problems, [per_problem[0] for per_problem in agg.traces]).correct_BN
        for b, problem in enumerate(problems):
            truth = [atask.candidate_verdict(c, problem) for c in agg.shown[b][0]]
            by_right.setdefault(n_right[b], []).extend(correct_BA[b].tolist())
            for trace in agg.traces[b][0]:
                said = audit_verdicts(trace.text)
                rates.append(verdict_agreement(said, truth))
                kept = kept_candidate(trace.text)
                if kept is not None:
                    keeps += 1
                    keeps_judged_right += says_right(said.get(kept + 1, ""))
                for k, verdict in enumerate(truth, start=1):
                    line = said.get(k)
                    if not says_right(verdict) and line is not None and says_right(line):
                        misjudged += 1
                        misjudged_sound += arithmetic_holds(line)
                        misjudged_faithful += STEP.findall(line) == STEP.findall(verdict)
        table = torch.tensor(rates, dtype=torch.float64).nanmean(0).tolist()
        accuracy = sum(sum(v) for v in by_right.values()) / sum(len(v) for v in by_right.values())
        split = " ".join(f"{k}:{sum(v) / len(v):.3f}" for k, v in sorted(by_right.items()))
        print(
            f"{spec}: aggregation {accuracy:.3f}; by right candidates {split}; verdict_exact {table[0]:.3f}, "
            f"wrong_called_right {table[1]:.3f}, right_called_wrong {table[2]:.3f}; wrong called right with sound "
            f"arithmetic {misjudged_sound}/{misjudged}, with the task's own steps (a faithful copy of the candidate's "
            f"operations) {misjudged_faithful}/{misjudged}; keeps a candidate its own line called right "
            f"{keeps_judged_right}/{keeps}"
        )


if __name__ == "__main__":
    main()
