"""evaluation.py on the tiny random Llama: every scaffold's values, RSA shapes and token accounting, batch invariance.

``VoteTask`` (tests/hash_task.py) gives the random model's traces pseudo-random answers and
verdicts, so accuracies and votes are non-trivial.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hash_task import VoteTask

from spiral_lit.evaluation.held_out import (
    EvalConfig,
    accuracy_by_correct_count,
    copies_candidate,
    evaluate_problems,
    score_traces,
)
from spiral_lit.prompts import PromptConfig, PromptRenderer
from spiral_lit.rollout import KVCacheEngine, SamplingConfig
from spiral_lit.runtime.policy import Sampler
from spiral_lit.scaffolds import derive_seed, recursive_aggregation, sample_search
from spiral_lit.tasks.base import answer_keys
from spiral_lit.tasks.verify import Verifier

CONFIG = EvalConfig(
    n_samples=3, pass_k=[1, 2], set_size=2, n_agg=2, budgets=[3, 6], rsa_population=3, rsa_set_size=2, rsa_rounds=2
)
SEARCH = SamplingConfig(max_new_tokens=6, temperature=1.0)
AGGREGATION = SamplingConfig(max_new_tokens=5, temperature=1.0)


@pytest.fixture(scope="module")
def parts(loaded_policy):
    model, tokenizer = loaded_policy
    task = VoteTask(n_terms=2, digits=2)
    renderer = PromptRenderer(tokenizer, PromptConfig(), task.answer_instruction)
    with Verifier(task, num_workers=0) as verifier:
        problems = [task.problem(i, "heldout") for i in range(3)]
        yield Sampler(KVCacheEngine(model, tokenizer), renderer, verifier), problems


def _evaluate(parts, problems, config: EvalConfig = CONFIG) -> dict[str, torch.Tensor]:
    return evaluate_problems(parts[0], problems, config, SEARCH, AGGREGATION)


def test_every_scaffold_reports_per_problem_values(parts) -> None:
    problems = parts[1]
    values = _evaluate(parts, problems)
    per_problem = (
        ["search/pass@1", "search/pass@2", "search/prompt_tokens", "search/length"]
        + [f"search/{m}@{k}" for m in ("maj", "tokens") for k in (1, 2, 3)]
        + [f"sequential/{m}@{b}" for m in ("accuracy", "tokens", "prompt_tokens") for b in (3, 6)]
        + [f"aggregation/{m}" for m in ("accuracy", "tokens", "prompt_tokens", "length")]
        + [f"aggregation/{m}" for m in ("set_oracle", "set_majority", "recovery", "override", "distinct_answers")]
        + [f"aggregation/accuracy_given_{c}correct" for c in (0, 1, 2)]
        + [f"rsa/{m}@{t}" for m in ("accuracy", "majority", "tokens", "prompt_tokens") for t in (0, 1, 2)]
    )
    per_set = [f"rsa/{m}" for m in ("set_oracle", "set_majority", "recovery", "override", "distinct_answers")]
    per_set += [f"rsa/accuracy_given_{c}correct" for c in (0, 1, 2)]
    assert set(values) == set(per_problem) | set(per_set)
    assert all(values[k].shape == (3,) for k in per_problem)
    assert all(values[k].shape == (3 * 3,) for k in per_set)  # one value per RSA member's set in round 1
    for key in ("search/pass@2", "search/maj@3", "aggregation/accuracy", "rsa/accuracy@2", "sequential/accuracy@6"):
        assert bool(((values[key] >= 0) & (values[key] <= 1)).all()), key
    assert bool((values["search/pass@2"] >= values["search/pass@1"]).all())
    assert 0 < float(values["search/pass@1"].mean()) < 1  # VoteTask: about a third of the traces are right
    assert bool((values["sequential/tokens@3"] <= 3).all()) and bool((values["sequential/tokens@6"] <= 6).all())
    defined = ~values["aggregation/recovery"].isnan()
    assert torch.equal(defined, values["aggregation/set_majority"] == 0)  # recovery only where the majority is wrong


def test_token_accounting_matches_the_scaffolds(parts) -> None:
    sampler, problems = parts
    engine, renderer = sampler.engine, sampler.renderer
    values = _evaluate(parts, problems)
    seeds = [derive_seed(CONFIG.seed, p.uid) for p in problems]
    search = sample_search(engine, renderer, problems, 3, SEARCH, [derive_seed(s, "search") for s in seeds])
    search_tokens = torch.tensor([float(sum(t.num_tokens for t in ts)) for ts in search.traces])
    assert torch.equal(values["search/tokens@3"], search_tokens)
    assert torch.equal(values["search/length"], search_tokens / 3)
    assert torch.equal(values["rsa/tokens@0"], search_tokens)  # P_0 = the 3 search traces
    assert torch.equal(values["rsa/prompt_tokens@0"], torch.tensor([float(len(p)) for p in search.prompts]))

    rounds = recursive_aggregation(engine, renderer, problems, search.traces, 2, 2, AGGREGATION,
                                   [derive_seed(s, "rsa") for s in seeds])  # fmt: skip
    assert len(rounds) == 2
    for t, agg in enumerate(rounds, start=1):
        assert agg.sets_BKS.shape == (3, 3, 2)  # [B, N members, K candidates]
        assert bool((agg.sets_BKS[:, :, 0] < agg.sets_BKS[:, :, 1]).all())  # distinct candidates per set
        assert [[len(per_set) for per_set in per_problem] for per_problem in agg.traces] == [[1] * 3] * 3
        generated = torch.tensor([float(sum(s[0].num_tokens for s in per_problem)) for per_problem in agg.traces])
        read = torch.tensor([float(sum(len(p) for p in per_problem)) for per_problem in agg.prompts])
        assert torch.equal(values[f"rsa/tokens@{t}"] - values[f"rsa/tokens@{t - 1}"], generated)
        assert torch.equal(values[f"rsa/prompt_tokens@{t}"] - values[f"rsa/prompt_tokens@{t - 1}"], read)


def test_a_problems_values_do_not_depend_on_its_batch(parts) -> None:
    """Seeds come from (eval.seed, uid): what makes 1 and N DDP processes agree (docs/algorithm.md §7.1)."""
    problems = parts[1]
    together = _evaluate(parts, problems)
    alone = _evaluate(parts, problems[1:2])
    swapped = _evaluate(parts, [problems[2], problems[0]])
    for key, value in together.items():
        if value.shape == (3,):
            torch.testing.assert_close(alone[key], value[1:2], equal_nan=True, msg=key)
            torch.testing.assert_close(swapped[key], value[[2, 0]], equal_nan=True, msg=key)
    other_seed = _evaluate(parts, problems, dataclasses.replace(CONFIG, seed=7))
    assert any(not torch.equal(other_seed[k].nan_to_num(-1), v.nan_to_num(-1)) for k, v in together.items())


def test_defaults_skip_the_costly_scaffolds(parts) -> None:
    values = _evaluate(parts, parts[1][:1], EvalConfig(n_samples=2, pass_k=[1], set_size=0))
    assert set(values) == {"search/pass@1", "search/maj@1", "search/maj@2", "search/tokens@1", "search/tokens@2",
                           "search/prompt_tokens", "search/length"}  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budgets": [0]}, r"eval\.budgets"),
        ({"rsa_set_size": 9}, r"eval\.rsa_set_size"),
        ({"rsa_population": 0}, r"eval\.rsa_population"),
        ({"rsa_rounds": -1}, r"eval\.rsa_rounds"),
        ({"predict_scaffold": "rsa"}, r"eval\.predict_scaffold='rsa' needs eval\.rsa_rounds"),
        ({"pass_k": [9]}, r"eval\.pass_k"),
    ],
)
def test_bad_eval_config_names_the_key(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EvalConfig(**kwargs)


def test_accuracy_by_correct_count_splits_sets_by_their_right_candidates() -> None:
    correct_BKS = torch.tensor([[[1, 0, 0], [1, 1, 0]], [[0, 0, 0], [1, 0, 0]]], dtype=torch.bool)
    accuracy_BK = torch.tensor([[0.5, 1.0], [0.25, 0.75]])
    out = accuracy_by_correct_count(correct_BKS, accuracy_BK)
    assert list(out) == [f"accuracy_given_{c}correct" for c in range(4)]
    nan = float("nan")
    torch.testing.assert_close(out["accuracy_given_0correct"], torch.tensor([[nan, nan], [0.25, nan]]), equal_nan=True)
    torch.testing.assert_close(out["accuracy_given_1correct"], torch.tensor([[0.5, nan], [nan, 0.75]]), equal_nan=True)
    torch.testing.assert_close(out["accuracy_given_2correct"], torch.tensor([[nan, 1.0], [nan, nan]]), equal_nan=True)
    assert bool(out["accuracy_given_3correct"].isnan().all())


def test_copies_candidate_is_the_share_of_answers_taken_from_the_set() -> None:
    answers_BA = [["7", "8", None, "7"], ["1", "2"]]
    shown_BS = [["7", None, "9"], [None, None]]
    torch.testing.assert_close(copies_candidate(answers_BA, shown_BS), torch.tensor([0.5, 0.0]))


def test_controls_aggregate_wrong_and_foreign_sets(parts) -> None:
    problems = parts[1]
    config = dataclasses.replace(CONFIG, controls=True, rsa_rounds=0, budgets=[])
    values = _evaluate(parts, problems, config)
    keys = [f"control/{k}_{m}" for k in ("all_wrong", "shuffled") for m in ("accuracy", "copies")]
    assert all(values[k].shape == (3,) for k in keys)
    for key in keys:
        kept = values[key][~values[key].isnan()]
        assert bool(((kept >= 0) & (kept <= 1)).all()), key
    assert not bool(values["control/shuffled_accuracy"].isnan().any())
    # all_wrong is defined exactly where a problem has at least set_size wrong traces among its n_samples.
    baseline = _evaluate(parts, problems, dataclasses.replace(config, controls=False))
    n_wrong = (1 - baseline["search/pass@1"]) * config.n_samples
    defined = ~values["control/all_wrong_accuracy"].isnan()
    assert defined.tolist() == (n_wrong.round() >= config.set_size).tolist()
    # The controls draw their own seeds: every other scaffold's values are unchanged by turning them on.
    for key, value in baseline.items():
        torch.testing.assert_close(values[key], value, equal_nan=True)


def test_controls_need_a_set() -> None:
    with pytest.raises(ValueError, match="eval.controls"):
        EvalConfig(set_size=0, controls=True)


def test_maj_and_copies_compare_answer_keys() -> None:
    # Countdown 5 1 5 -> 30: three differently written right answers outvote two identical wrong ones.
    from spiral_lit.rollout.base import Completion
    from spiral_lit.tasks import CountdownTask

    task = CountdownTask()
    problem = task.problem(0, "train")
    texts = ["5*6", "(1+5)*5", "5*6", "5*(1+5)", "(5+1)*5"]
    traces = [[Completion([0], torch.zeros(1), "stop", f"<answer>{t}</answer>") for t in texts]]
    with Verifier(task, num_workers=0) as verifier:
        scored = score_traces(verifier, [problem], traces)
    assert scored.majority_B().tolist() == [1.0]
    assert scored.head(3).majority_B().tolist() == [0.0]  # "5*6" twice against one right answer
    # An aggregation that rewrote a shown right answer copies it.
    shown = answer_keys(task, [problem] * 2, ["(1+5)*5", "5*6"])
    written = answer_keys(task, [problem] * 2, ["5*(5+1)", "5*5+1"])
    torch.testing.assert_close(copies_candidate([written], [shown]), torch.tensor([0.5]))
