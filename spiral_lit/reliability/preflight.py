"""Checks run by the CLI before any model is loaded: settings that would train nothing, output directories
that cannot be written, model files that are missing, and what needs the tokenizer and the model's config but
not its weights (the chat template and EOS token, token budgets against the model's context, the update's
minibatch split against the sequences a step produces). One check only warns: bf16 asked of a CPU that runs it
far slower than fp32 (docs/algorithm.md §8.7).

Outputs are checked, not created (Lightning creates them when it first writes): an existing directory must be
writable, and a missing one must be creatable, so a checkpoint directory below a file or in a read-only place
fails at start instead of at the first save, after training.

A prompt plus its generation longer than the model's ``max_position_embeddings`` does not fail: rotary
models run past it and silently degrade. So the budgets are checked up front, on the longest prompt of a
sample of the run's problems, with every candidate of an aggregation prompt at its maximal length.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from spiral_lit.errors import UserError
from spiral_lit.evaluation.held_out import EvalConfig
from spiral_lit.prompts import PromptConfig, PromptRenderer
from spiral_lit.runtime.cpu_precision import SLOW_BF16, bf16_speedup
from spiral_lit.runtime.models import PolicyConfig, check_policy_files, context_length, load_tokenizer
from spiral_lit.tasks.base import Problem
from spiral_lit.training.data import ProblemDataModule

_SAMPLE = 64
"""Problems per split whose prompts are measured."""
_MODEL = "model.init_args."


@dataclass
class Need:
    """One kind of sequence a run generates (or trains on) and the YAML keys that size it."""

    what: str
    keys: str
    prompt_tokens: int
    new_tokens: int
    uid: str


def _longest(problems: list[Problem], render: Callable[[Problem], list[int]]) -> tuple[int, str]:
    """(tokens, uid) of the longest rendered sequence."""
    return max((len(render(p)), p.uid) for p in problems)


def _aggregation_needs(
    renderer: PromptRenderer, problems: list[Problem], set_size: int, candidate_tokens: int
) -> tuple[int, str]:
    """Longest aggregation prompt with ``set_size`` candidates of ``candidate_tokens`` tokens each (after the cut)."""
    shown = min(candidate_tokens, renderer.config.max_candidate_tokens)
    rng = random.Random(0)
    tokens, uid = _longest(problems, lambda p: renderer.aggregation_from_texts(p, [""] * set_size, rng))
    return tokens + set_size * shown, uid


def _eval_needs(
    renderer: PromptRenderer,
    problems: list[Problem],
    config: EvalConfig,
    search_new: int,
    agg_new: int,
    keys: dict[str, str],
) -> list[Need]:
    """Evaluation's traces: search, sequential budgets, one aggregation, RSA rounds."""
    search, uid = _longest(problems, renderer.search)
    needs = [Need("search traces", keys["search"], search, search_new, uid)]
    if config.budgets:
        needs.append(Need("sequential-budget traces", f"{_MODEL}eval.budgets", search, max(config.budgets), uid))
    if config.set_size:
        tokens, uid = _aggregation_needs(renderer, problems, config.set_size, search_new)
        needs.append(Need("evaluation aggregation traces", f"{_MODEL}eval.set_size, {keys['aggregation']}", tokens,
                          agg_new, uid))  # fmt: skip
    if config.rsa_rounds:
        tokens, uid = _aggregation_needs(renderer, problems, config.rsa_set_size, max(search_new, agg_new))
        needs.append(Need("RSA aggregation traces", f"{_MODEL}eval.rsa_set_size, {keys['aggregation']}", tokens,
                          agg_new, uid))  # fmt: skip
    return needs


def token_needs(module: L.LightningModule, renderer: PromptRenderer, problems: list[Problem]) -> list[Need]:
    """Every kind of sequence ``module`` (SpiralModule or WarmStartModule) will build from ``problems``."""
    from spiral_lit.training.spiral_module import SpiralModule
    from spiral_lit.training.warm_start import WarmStartModule

    cut = f"{_MODEL}prompts.max_candidate_tokens"
    if isinstance(module, SpiralModule):
        search_new = module.search_sampling.max_new_tokens
        agg_new = module.aggregation_sampling.max_new_tokens
        keys = {
            "search": f"{_MODEL}search_sampling.max_new_tokens",
            "aggregation": f"{cut}, {_MODEL}search_sampling.max_new_tokens, "
            f"{_MODEL}aggregation_sampling.max_new_tokens",
        }
        needs = _eval_needs(renderer, problems, module.eval_config, search_new, agg_new, keys)
        if module.algo.algorithm == "spiral":
            tokens, uid = _aggregation_needs(renderer, problems, module.algo.set_size, search_new)
            keys_agg = f"{_MODEL}algorithm.set_size, {keys['aggregation']}"
            needs.append(Need("training aggregation traces", keys_agg, tokens, agg_new, uid))
        return needs
    if isinstance(module, WarmStartModule):
        new = module.eval_sampling.max_new_tokens
        key = f"{_MODEL}eval_sampling.max_new_tokens"
        keys = {"search": key, "aggregation": f"{cut}, {key}"}
        needs = _eval_needs(renderer, problems, module.eval_config, new, new, keys)
        solved = [p for p in problems if p.solution]
        if solved:
            eos = renderer.tokenizer.eos_token
            rng = random.Random(0)
            candidates = module.hparams["set_size"]

            def search_example(p: Problem) -> list[int]:
                return renderer.search(p) + renderer.tokenizer.encode(p.solution + eos, add_special_tokens=False)

            def aggregation_example(p: Problem) -> list[int]:
                prompt = renderer.aggregation_from_texts(p, [cast(str, p.solution)] * candidates, rng)  # p is solved
                return prompt + renderer.tokenizer.encode(p.solution + eos, add_special_tokens=False)

            tokens, uid = _longest(solved, search_example)
            needs.append(Need("warm-start search examples", "data.task", tokens, 0, uid))
            tokens, uid = _longest(solved, aggregation_example)
            needs.append(Need("warm-start aggregation examples", f"{_MODEL}set_size, {cut}", tokens, 0, uid))
        return needs
    return []


def check_token_budgets(module: L.LightningModule, data: ProblemDataModule) -> None:
    """Raise, naming the keys, if a prompt plus its generation can exceed the model's context; loads no weights."""
    policy: PolicyConfig | None = getattr(module, "policy_config", None)
    prompts: PromptConfig | None = getattr(module, "prompt_config", None)
    if policy is None or prompts is None:
        return
    tokenizer = load_tokenizer(policy)  # also refuses a tokenizer without chat template or EOS
    context = context_length(policy)
    if context is None:
        return
    renderer = PromptRenderer(tokenizer, prompts, data.task.answer_instruction)
    n_train = data.task.num_problems("train")
    problems = list(data.heldout[:_SAMPLE]) + [
        data.task.problem(i, "train") for i in range(_SAMPLE if n_train is None else min(_SAMPLE, n_train))
    ]
    problems += (data.predict_problems or [])[:_SAMPLE]
    for need in token_needs(module, renderer, problems):
        total = need.prompt_tokens + need.new_tokens
        if total > context:
            size = (
                f"the longest prompt ({need.prompt_tokens} tokens, problem {need.uid}) plus {need.new_tokens} new "
                f"tokens = {total} tokens"
                if need.new_tokens
                else f"the longest one ({total} tokens, problem {need.uid})"
            )
            raise UserError(
                f"{need.what}: {size} exceeds the {context}-token context of policy.path={policy.path!r} "
                f"(max_position_embeddings in its config.json). Lower {need.keys}"
            )


def check_minibatches(module: L.LightningModule, data: ProblemDataModule) -> None:
    """``update.num_minibatches`` must not exceed the sequences of a step, or some optimiser steps get no data."""
    from spiral_lit.training.spiral_module import SpiralModule

    if not isinstance(module, SpiralModule):
        return
    algo = module.algo
    per_prompt = algo.n_search + (algo.n_sets * algo.n_agg if algo.algorithm == "spiral" else 0)
    sequences = data.batch_size * per_prompt
    if module.update_config.num_minibatches > sequences:
        raise UserError(
            f"{_MODEL}update.num_minibatches={module.update_config.num_minibatches} exceeds the {sequences} "
            f"sequences of a step (data.batch_size={data.batch_size} x {per_prompt} per prompt): some optimiser "
            "steps would have no data"
        )


def _write_error(directory: Path) -> str | None:
    """Why nothing can be created in the existing ``directory`` (None when something can). ``os.access`` misses
    some refusals (sysfs, root-squashed NFS, immutable directories), so an empty directory is created there and
    removed again."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return "it is not writable by this user"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".spiral_lit_write_check-", dir=directory))
    except OSError as error:
        return f"nothing can be created in it ({error.strerror or error})"
    return None


def check_writable(path: str | Path, key: str) -> None:
    """Raise, naming ``key`` and ``path``, unless ``path`` is a directory we may write or may create. Leaves
    nothing behind: a missing directory is created later, by whatever writes there first, as before."""
    target = Path(path).expanduser().absolute()
    fix = "choose another location or fix its permissions"
    if target.exists():
        if not target.is_dir():
            raise UserError(f"{key}={str(path)!r} is a file, not a directory: {fix}")
        if (why := _write_error(target)) is not None:
            raise UserError(f"{key}={str(path)!r}: {why}; {fix}")
        return
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{key}={str(path)!r}: cannot create this directory, {str(ancestor)!r} is a file; {fix}")
    if (why := _write_error(ancestor)) is not None:
        raise UserError(f"{key}={str(path)!r}: cannot create this directory below {str(ancestor)!r}: {why}; {fix}")


def output_dirs(trainer: L.Trainer, stage: str) -> list[tuple[str, str]]:
    """(directory, YAML key) of every local location the run writes: the loggers' directories (or
    ``default_root_dir`` without a logger) and, for ``fit``, checkpoint and export directories given explicitly
    (their defaults lie under the log directory, checked already)."""
    from spiral_lit.reliability.callbacks import HFExport, PredictionWriter

    dirs: list[tuple[str, str]] = []
    for logger in trainer.loggers:
        key = "trainer.logger.init_args.save_dir"
        if len(trainer.loggers) > 1:
            key = f"trainer.logger[{type(logger).__name__}].init_args.save_dir"
        dirs += [(str(d), key) for d in (logger.save_dir, getattr(logger, "log_dir", None)) if d]
    if not trainer.loggers:
        dirs.append((trainer.default_root_dir, "trainer.default_root_dir"))
    for callback in trainer.callbacks:  # type: ignore[attr-defined]  # set by Lightning's callback connector
        name = type(callback).__name__
        if stage == "fit" and isinstance(callback, (ModelCheckpoint, HFExport)) and callback.dirpath:
            dirs.append((str(callback.dirpath), f"trainer.callbacks[{name}].init_args.dirpath"))
        if stage == "predict" and isinstance(callback, PredictionWriter) and callback.output_path:
            dirs.append((str(Path(callback.output_path).parent), "prediction_writer.output_path (its directory)"))
    return [(d, key) for d, key in dirs if "://" not in d]  # remote file systems are the logger's business


def _bf16_weights(policy: PolicyConfig) -> str | None:
    """Why the policy's weights load in bf16, or None: ``policy.dtype: bfloat16``, or ``auto`` on a local checkpoint
    whose ``config.json`` stores bf16, as most hub models do (a hub id is not fetched here)."""
    if policy.dtype == "bfloat16":
        return "policy.dtype is bfloat16"
    config = Path(policy.path) / "config.json"
    if policy.dtype != "auto" or not config.is_file():
        return None
    try:
        stored = json.loads(config.read_text())
    except (OSError, ValueError):
        return None  # check_policy_files names a broken config
    if isinstance(stored, dict) and (stored.get("dtype") or stored.get("torch_dtype")) == "bfloat16":
        return f"policy.dtype is auto and {config} stores bfloat16"
    return None


def check_cpu_precision(trainer: L.Trainer, policy: PolicyConfig | None = None) -> None:
    """Warn when a CPU run asks for bf16 (``trainer.precision`` or the weights' dtype) that this CPU runs at under
    :data:`SLOW_BF16` of fp32's speed: the run is correct, only slow (~100x on an AVX2 CPU), and fp32 trains the same
    at fp32 cost. A warning, not an error, since the user asked for it; timing the two dtypes takes well under a
    second where bf16 is fast."""
    asked = []  # (what asked for bf16, the flag that turns it off)
    if "bf16" in str(trainer.precision):
        asked.append((f"trainer.precision is {trainer.precision}", "--trainer.precision 32-true"))
    weights = None if policy is None else _bf16_weights(policy)
    if weights is not None:
        asked.append((weights, "--model.init_args.policy.dtype float32"))
    if not isinstance(trainer.accelerator, CPUAccelerator) or not asked:
        return
    speedup = bf16_speedup()
    if speedup < SLOW_BF16:
        rank_zero_warn(
            f"{' and '.join(what for what, _ in asked)}, but this CPU (torch capability "
            f"{torch.backends.cpu.get_cpu_capability()}) runs bf16 matmuls {1.0 / speedup:.0f}x slower than fp32 ones "
            f"(no native bf16): {' '.join(flag for _, flag in asked)} will be much faster"
        )


def check_training_settings(module: L.LightningModule) -> None:
    """``fit`` only: the training sampling must let samples of a prompt differ (evaluation may be greedy)."""
    from spiral_lit.training.spiral_module import SpiralModule
    from spiral_lit.training.step_config import check_training_sampling

    if isinstance(module, SpiralModule):
        check_training_sampling(module.algo, module.search_sampling, module.aggregation_sampling, _MODEL)


def preflight(
    module: L.LightningModule, data: L.LightningDataModule, trainer: L.Trainer | None = None, stage: str | None = None
) -> None:
    """Every check above, for the CLI's ``before_<subcommand>`` hooks (``stage`` is the subcommand). Without a
    trainer the output directories are not checked; without a stage the fit-only checks are skipped."""
    if stage == "fit":
        check_training_settings(module)
    policy: PolicyConfig | None = getattr(module, "policy_config", None)
    if trainer is not None:
        check_cpu_precision(trainer, policy)  # a warning only: bf16 without native support is slow, not wrong
        for directory, key in output_dirs(trainer, stage or ""):
            check_writable(directory, key)
    if policy is not None:
        check_policy_files(policy)  # a missing tokenizer or weights file, a hub id we cannot reach
    if isinstance(data, ProblemDataModule):
        check_minibatches(module, data)
        check_token_budgets(module, data)
