"""rollout/__init__.py: the one table that says how each backend is built and what it supports."""

from __future__ import annotations

import typing

import pytest

from spiral_lit.errors import UserError
from spiral_lit.rollout import BACKENDS, Backend, HFGenerateEngine, KVCacheEngine, check_backend, make_engine


def test_every_backend_option_has_a_spec() -> None:
    assert set(BACKENDS) == set(typing.get_args(Backend))


@pytest.mark.parametrize("sharding", ["fsdp1", "fsdp2"])
def test_only_hf_decodes_a_sharded_policy(sharding: str) -> None:
    assert check_backend("hf", sharding) is BACKENDS["hf"]
    for backend in ("kv_cache", "vllm"):
        assert check_backend(backend) is BACKENDS[backend]  # type: ignore[arg-type]
        with pytest.raises(UserError, match=f"model.rollout_backend='{backend}'.*set model.rollout_backend: hf"):
            check_backend(backend, sharding)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="allowed: 'hf', 'kv_cache', 'vllm'"):
        check_backend("bogus")  # type: ignore[arg-type]


def test_make_engine_dispatches_on_backend(loaded_policy) -> None:
    model, tokenizer = loaded_policy
    assert isinstance(make_engine("kv_cache", model, tokenizer, 8), KVCacheEngine)
    assert isinstance(make_engine("hf", model, tokenizer, 8), HFGenerateEngine)
    with pytest.raises(ValueError, match="backend='bogus'"):
        make_engine("bogus", model, tokenizer)  # type: ignore[arg-type]
