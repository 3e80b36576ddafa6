"""step_config.py: rollout shapes and training sampling under which an advantage is identically zero are refused,
naming the YAML key (docs/algorithm.md §3.7)."""

from __future__ import annotations

import warnings

import pytest

from spiral_lit.errors import UserError
from spiral_lit.rollout.base import SamplingConfig
from spiral_lit.training.step_config import AlgorithmConfig, check_training_sampling

KEY = r"model\.init_args\.algorithm\."


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_agg": 1}, KEY + r"n_agg=1: .*aggregation advantage .* is 0 .*aggregator never learns"),
        ({"n_sets": 1, "n_agg": 1}, KEY + r"n_sets=1 with algorithm\.n_agg=1"),
        ({"algorithm": "grpo", "n_search": 1, "set_size": 1}, KEY + r"n_search=1: GRPO"),
        ({"n_search": 4, "set_size": 4, "n_sets": 2}, r"only C\(4, 4\) = 1 distinct sets exist.*set_size < "),
        ({"n_search": 0}, KEY + r"n_search must be >= 1"),
        ({"length_target": 0}, KEY + r"length_target must be >= 1"),
    ],
)
def test_degenerate_shapes_are_user_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        AlgorithmConfig(**kwargs)


def test_one_set_per_prompt_warns_that_search_traces_learn_nothing() -> None:
    """The aggregator still learns (a user may mean it), but every search advantage is 0."""
    with pytest.warns(UserWarning, match=KEY + r"n_sets=1: .*search trace.* advantage 0"):
        AlgorithmConfig(n_sets=1, n_agg=4)
    with pytest.warns(UserWarning, match=KEY + r"n_sets=1"):
        AlgorithmConfig(n_search=4, set_size=4, n_sets=1)


def test_sound_shapes_pass_quietly() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AlgorithmConfig()
        AlgorithmConfig(n_search=2, n_sets=2, set_size=1, n_agg=2)
        AlgorithmConfig(algorithm="grpo", n_search=2, n_sets=1, set_size=1, n_agg=1)  # GRPO ignores the set keys


GREEDY, SAMPLED = SamplingConfig(temperature=0.0), SamplingConfig()


@pytest.mark.parametrize("algorithm", ["spiral", "grpo"])
def test_greedy_search_is_refused_for_training(algorithm: str) -> None:
    with pytest.raises(UserError, match=r"model\.init_args\.search_sampling\.temperature=0.*identical.*validate"):
        check_training_sampling(AlgorithmConfig(algorithm=algorithm), GREEDY, SAMPLED)


def test_greedy_aggregation_is_refused_under_spiral_only() -> None:
    message = r"model\.init_args\.aggregation_sampling\.temperature=0.*aggregator never learns"
    with pytest.raises(UserError, match=message):
        check_training_sampling(AlgorithmConfig(), SAMPLED, GREEDY)
    check_training_sampling(AlgorithmConfig(algorithm="grpo"), SAMPLED, GREEDY)  # GRPO samples no aggregations
    check_training_sampling(AlgorithmConfig(), SAMPLED, SAMPLED)
