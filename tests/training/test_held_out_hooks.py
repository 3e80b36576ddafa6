"""spiral_lit.training.held_out_hooks: which sampling settings each module's validate/test/predict use."""

from __future__ import annotations

import pytest

from spiral_lit import SpiralModule
from spiral_lit.errors import UserError
from spiral_lit.rollout.base import SamplingConfig
from spiral_lit.runtime.models import PolicyConfig
from spiral_lit.training.held_out_hooks import HeldOutEvaluation
from spiral_lit.training.strategy import HoldGatheredForEvaluation
from spiral_lit.training.warm_start import WarmStartModule
from tests.conftest import TinyPolicy


def test_the_rl_module_evaluates_each_role_as_it_samples_in_training(tiny_policy: TinyPolicy) -> None:
    search, aggregation = SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.6, max_new_tokens=96)
    module = SpiralModule(PolicyConfig(str(tiny_policy.path)), search_sampling=search, aggregation_sampling=aggregation)
    assert module.eval_samplings() == (search, aggregation)


def test_the_warm_start_evaluates_both_roles_with_its_eval_sampling(tiny_policy: TinyPolicy) -> None:
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=160)
    module = WarmStartModule(PolicyConfig(str(tiny_policy.path)), eval_sampling=sampling)
    assert module.eval_samplings() == (sampling, sampling)


def test_both_modules_refuse_to_build_without_a_task(tiny_policy: TinyPolicy) -> None:
    for module_class in (SpiralModule, WarmStartModule):
        with pytest.raises(UserError, match="model.task is not set"):
            module_class(PolicyConfig(str(tiny_policy.path))).configure_model()


def test_both_modules_gather_for_evaluation(tiny_policy: TinyPolicy) -> None:
    for module_class in (SpiralModule, WarmStartModule):
        module = module_class(PolicyConfig(str(tiny_policy.path)))
        assert isinstance(module, HeldOutEvaluation)
        assert any(isinstance(c, HoldGatheredForEvaluation) for c in module.configure_callbacks())
