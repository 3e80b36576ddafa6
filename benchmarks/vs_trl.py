"""spiral_lit against TRL's ``GRPOTrainer`` on identical GRPO work.

Run: ``python benchmarks/vs_trl.py`` (about 10 minutes on 2 quiet cores; ``--quick`` for a
~1-minute smoke run; ``--threads 1`` on a machine shared with other jobs). Needs the ``bench``
extra (``pip install -e ".[bench]"``, which pins ``trl==1.16.0``); TRL is imported only inside
the worker process that runs it. Prints tables and writes JSON (``--out``).

Identical work per optimiser step, on the same saved model (``rollout.py``'s ``tiny`` 1.83M and
``50m`` 47.4M Llamas: random weights, fp32, sdpa, the quickstart tokenizer):

- prompts: chain-sum training problems in spiral_lit's stream order (TRL: ``shuffle_dataset=False``),
  one user message through the chat template; the script asserts that TRL's ``generate`` receives
  exactly the prompt ids spiral_lit renders;
- ``--prompts`` x ``--generations`` completions of exactly ``--max-tokens`` tokens each: one
  ``lm_head`` forward hook bans EOS (so no completion stops early) and every token that is not
  printable ASCII on its own (random weights otherwise emit byte fragments that decode to U+FFFD
  and re-encode to 3 tokens each, inflating SPIRAL's aggregation prompts from ~375 to ~550 tokens;
  the hook is the same in all runs). Both sides count the generated tokens and the script asserts them;
- GRPO, no KL (TRL ``beta=0``), advantage = reward - group mean (TRL ``scale_rewards="none"``),
  clipped token ratio 1 - 0.2 .. 1 + 0.28 (TRL ``epsilon``, ``epsilon_high``), loss = sum over
  completion tokens / their number (spiral_lit ``token_mean``, TRL ``loss_type="dapo"``), one optimiser
  step per rollout batch (TRL ``num_iterations=1``, ``steps_per_generation=1``) over one forward/backward
  of all rows (spiral_lit ``micro_batch_size`` = rows, TRL ``per_device_train_batch_size`` = rows),
  torch AdamW (lr 1e-6, no weight decay, constant rate), gradient norm clipped at 1, fp32 (``--precision
  bf16-mixed``: bf16 autocast over fp32 weights on both sides, spiral_lit ``Trainer(precision="bf16-mixed")``, TRL
  ``bf16=True``, each framework as it implements that setting), no gradient
  checkpointing, no logging, checkpointing or evaluation; neither recomputes old log-probabilities;
- rewards: the chain_sum verifier on both sides (answer extraction + ``ChainSumTask.score``; spiral_lit
  through its ``Verifier``, TRL as a reward function). Random weights never write an answer, so every
  reward and advantage is 0; spiral_lit's dynamic sampling (which would drop such prompts and skip
  their update) is off, so both run the full forward/backward over every sequence.

spiral_lit runs ``SpiralModule.training_step`` under a Lightning ``Trainer`` (``kv_cache`` engine,
verify, advantages, update); TRL runs ``GRPOTrainer.train`` (``model.generate``). Each repetition of
each framework is a fresh subprocess (its own peak memory); frameworks alternate and their order flips
every repetition. A step's wall time runs from the end of the previous optimiser step (or the start of
training) to the end of this one; the first step is a warm-up, reported apart, not in the medians.
Generated tokens/s = the step's generated tokens / its wall time; the generation phase alone is shown
too. Peak RSS = the worker's ``ru_maxrss`` (model, optimiser, framework, activations).

Memory allocator: on CPU spiral_lit has glibc's malloc keep freed memory for reuse
(``spiral_lit/training/cpu_memory.py``,
on by default), which TRL does not do. TRL runs as shipped, and once more per repetition in a process with that
same setting applied (``trl_keep_freed``), so the table shows how much of the ratio that setting accounts for.

SPIRAL mode: ``SpiralModule`` with ``algorithm=spiral`` at the paper's shape (``--generations``
search traces, 4 sets of 4, 4 aggregation traces per set, the same budget per trace) on the same
prompts, reported as seconds per generated token relative to GRPO mode on the same model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import MODEL_SIZES, build_models  # noqa: E402  (benchmarks/ is not a package)

N_SETS, SET_SIZE, N_AGG = 4, 4, 4
"""The paper's SPIRAL shape besides the search traces."""
MODES = ("spiral_lit", "trl", "trl_keep_freed", "spiral")
"""spiral_lit in GRPO mode, TRL's GRPOTrainer as shipped, TRL's GRPOTrainer in a process whose malloc keeps freed
memory as spiral_lit's does on CPU (spiral_lit/training/cpu_memory.py; the ratio against it isolates that setting),
spiral_lit in SPIRAL mode."""


@dataclass
class Work:
    """The shape of one optimiser step, the same in every run."""

    prompts: int = 8
    generations: int = 8
    """Completions per prompt (GRPO group; SPIRAL search traces)."""
    max_tokens: int = 64
    """Tokens of every completion."""
    steps: int = 2
    """Timed optimiser steps after the warm-up step."""
    lr: float = 1e-6
    threads: int | None = None
    """torch threads in every worker (None: torch's default)."""
    precision: str = "32-true"
    """``32-true`` or ``bf16-mixed``: spiral_lit's ``Trainer(precision=...)``, TRL's ``GRPOConfig(bf16=...)``."""

    def generated_tokens(self, mode: str) -> int:
        traces = self.generations + (N_SETS * N_AGG if mode == "spiral" else 0)
        return self.prompts * traces * self.max_tokens


class _StepClock:
    """Wall time, generated tokens, generation time and peak memory of each optimiser step."""

    def __init__(self) -> None:
        self.last = 0.0
        self.steps: list[dict[str, float]] = []

    def start(self) -> None:
        self.last = time.perf_counter()

    def end(self, generated_tokens: int, generate_seconds: float, phases: dict[str, float] | None = None) -> None:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        self.steps.append(
            (phases or {})
            | {
                "seconds": seconds,
                "generated_tokens": generated_tokens,
                "tokens_per_s": generated_tokens / seconds,
                "generate_seconds": generate_seconds,
                "generate_tokens_per_s": generated_tokens / max(generate_seconds, 1e-9),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: kB
            }
        )


# ---------------------------------------------------------------------------------------------- workers
def banned_tokens(tokenizer: Any) -> list[int]:
    """EOS (every special token) and every token that does not decode to printable ASCII on its own."""
    ascii_ok = [
        i
        for i in range(len(tokenizer))
        if i not in tokenizer.all_special_ids and all(" " <= c <= "~" or c == "\n" for c in tokenizer.decode([i]))
    ]
    return sorted(set(range(len(tokenizer))) - set(ascii_ok))


def ban_tokens(model: torch.nn.Module, token_ids: list[int]) -> None:
    """Logits of ``token_ids`` -> -inf in every forward through ``lm_head``.

    Both samplers go through it, and so does spiral_lit's training forward (its old log-probs are the
    sampler's, so the two must agree). TRL's training forward does not (its fused log-prob head reads
    ``lm_head.weight`` directly); its old log-probs are the detached current ones, a ratio of 1 either way.
    """
    banned = torch.tensor(token_ids, dtype=torch.long)

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], logits: torch.Tensor) -> None:
        logits[..., banned] = float("-inf")

    model.lm_head.register_forward_hook(hook)


def training_problems(n: int) -> list[Any]:
    """The first ``n`` problems of spiral_lit's training stream (held-out questions excluded)."""
    from spiral_lit.training.data import ProblemDataModule, ProblemStream

    data = ProblemDataModule(_task())
    stream = ProblemStream(data.task, data.seed, 0, 1, frozenset(p.question for p in data.heldout))
    return list(itertools.islice(iter(stream), n))


def _task() -> Any:
    from spiral_lit.tasks import ChainSumTask

    return ChainSumTask()


def run_spiral_lit(model_dir: str, work: Work, algorithm: str) -> list[dict[str, float]]:
    """``SpiralModule.training_step`` under a Lightning Trainer, warm-up + ``work.steps`` optimiser steps."""
    import lightning as L

    from spiral_lit import ProblemDataModule, SpiralModule
    from spiral_lit.rollout import SamplingConfig
    from spiral_lit.runtime.models import PolicyConfig
    from spiral_lit.training.spiral_module import AlgorithmConfig
    from spiral_lit.training.update import UpdateConfig

    sampling = SamplingConfig(max_new_tokens=work.max_tokens, temperature=1.0)
    module = SpiralModule(
        policy=PolicyConfig(model_dir),
        task=_task(),
        algorithm=AlgorithmConfig(
            algorithm=algorithm,
            n_search=work.generations,
            n_sets=N_SETS,
            set_size=SET_SIZE,
            n_agg=N_AGG,
            drop_zero_signal=False,  # all rewards are 0 (module docstring): update every sequence, as TRL does
        ),
        update=UpdateConfig(
            loss_type="ppo_clip",
            clip_low=0.2,
            clip_high=0.28,
            reduction="token_mean",
            micro_batch_size=work.prompts * work.generations,
            micro_batch_tokens=8192,  # GRPO rows fit in one micro-batch; SPIRAL's long aggregation rows are split
            max_grad_norm=1.0,
        ),
        search_sampling=sampling,
        aggregation_sampling=sampling,
        optimizer=lambda params: torch.optim.AdamW(params, lr=work.lr, weight_decay=0.0),
        rollout_backend="kv_cache",
        log_rollouts_every_n_steps=10**9,
    )
    module.configure_model()
    ban_tokens(module.policy, banned_tokens(module.runtime.tokenizer))
    clock, seen, trained = _StepClock(), [], {"tokens": 0}
    update = module._update

    def counting_update(sequences: list[Any]) -> dict[str, float]:
        """The update, counting the tokens it trains on: each distinct prompt once (the shared-prompt forward)
        plus every completion token."""
        prompts = {tuple(s.prompt_ids) for s in sequences}
        trained["tokens"] = sum(map(len, prompts)) + sum(s.completion.num_tokens for s in sequences)
        return update(sequences)

    module._update = counting_update  # instance attribute: training_step calls self._update

    class Clock(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            clock.start()

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, idx) -> None:
            metrics = trainer.callback_metrics
            tokens = sum(int(metrics[k]) for k in ("tokens/search", "tokens/aggregation") if k in metrics)
            phases = {f"{k}_seconds": float(metrics[f"time/{k}"]) for k in ("verify", "update")}
            phases["trained_tokens"] = trained["tokens"]
            clock.end(tokens, float(metrics["time/generate"]), phases)
            seen.extend(p.uid for p in batch)

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=work.precision,
        max_steps=work.steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Clock()],
    )
    trainer.fit(module, datamodule=ProblemDataModule(module.task, batch_size=work.prompts))
    assert seen == [p.uid for p in training_problems(len(seen))], "spiral_lit must train on the stream's problems"
    return clock.steps


def run_trl(model_dir: str, work: Work) -> list[dict[str, float]]:
    """TRL's ``GRPOTrainer`` with the settings of the module docstring."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from spiral_lit.prompts import PromptConfig, PromptRenderer, search_text
    from spiral_lit.runtime.models import PolicyConfig, load_tokenizer

    task = _task()
    tokenizer = load_tokenizer(PolicyConfig(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    ban_tokens(model, banned_tokens(tokenizer))
    problems = training_problems(work.prompts * (work.steps + 1))
    messages = [
        [{"role": "user", "content": search_text(p, task.answer_instruction, PromptConfig())}] for p in problems
    ]
    dataset = Dataset.from_list([{"prompt": m, "answer": p.answer} for m, p in zip(messages, problems, strict=True)])
    renderer = PromptRenderer(tokenizer, PromptConfig(), task.answer_instruction)
    expected_prompts = sorted(renderer.search(p) for p in problems for _ in range(work.generations))
    seen_prompts: list[list[int]] = []
    counted = {"tokens": 0, "generate_seconds": 0.0}

    def chain_sum_reward(completions: list[Any], completion_ids: list[list[int]], answer: list[str], **_: Any):
        """spiral_lit's verification (extract, then ``ChainSumTask.score``), inline."""
        counted["tokens"] += sum(len(ids) for ids in completion_ids)
        rewards = []
        for completion, gold in zip(completions, answer, strict=True):
            extracted = task.extract_answer(completion[0]["content"])
            rewards.append(0.0 if extracted is None else task.score(extracted, _Gold(gold)))
        return rewards

    generate = model.generate

    def timed_generate(*args: Any, **kwargs: Any) -> Any:
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"].bool()
        seen_prompts.extend(row[keep].tolist() for row, keep in zip(ids, mask, strict=True))
        start = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            counted["generate_seconds"] += time.perf_counter() - start

    model.generate = timed_generate  # instance attribute: TRL calls model.generate on the unwrapped CPU model
    clock = _StepClock()

    class Clock(TrainerCallback):
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            clock.start()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            clock.end(counted["tokens"], counted["generate_seconds"])
            counted["tokens"], counted["generate_seconds"] = 0, 0.0

    with tempfile.TemporaryDirectory() as out_dir:
        config = GRPOConfig(
            output_dir=out_dir,
            use_cpu=True,
            bf16=work.precision == "bf16-mixed",  # GRPOConfig defaults to bf16 and gradient checkpointing
            fp16=False,
            gradient_checkpointing=False,
            per_device_train_batch_size=work.prompts * work.generations,
            gradient_accumulation_steps=1,
            steps_per_generation=1,
            num_generations=work.generations,
            num_iterations=1,
            max_completion_length=work.max_tokens,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            beta=0.0,
            loss_type="dapo",
            epsilon=0.2,
            epsilon_high=0.28,
            scale_rewards="none",
            mask_truncated_completions=False,
            use_vllm=False,
            learning_rate=work.lr,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            optim="adamw_torch",
            max_grad_norm=1.0,
            max_steps=work.steps + 1,
            shuffle_dataset=False,
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            log_completions=False,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=chain_sum_reward,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[Clock()],
        )
        trainer.train()
    assert sorted(seen_prompts) == expected_prompts, "TRL must generate from the prompt ids spiral_lit renders"
    return clock.steps


class _Gold:
    """The one field of a problem that ``ChainSumTask.score`` reads."""

    def __init__(self, answer: str) -> None:
        self.answer = answer


def worker(spec: dict[str, Any]) -> None:
    """One repetition in this fresh process; writes its steps as JSON to ``spec['out']``."""
    work = Work(**spec["work"])
    if work.threads:
        torch.set_num_threads(work.threads)
    mode = spec["mode"]
    if mode == "trl_keep_freed":
        from spiral_lit.training.cpu_memory import keep_freed_memory

        reason = keep_freed_memory()
        assert reason is None, f"trl_keep_freed: {reason}"
    if mode.startswith("trl"):
        steps = run_trl(spec["model_dir"], work)
    else:
        steps = run_spiral_lit(spec["model_dir"], work, "spiral" if mode == "spiral" else "grpo")
    expected = work.generated_tokens(mode)
    counts = [s["generated_tokens"] for s in steps]
    assert counts == [expected] * (work.steps + 1), f"{mode}: generated tokens per step {counts}, expected {expected}"
    Path(spec["out"]).write_text(json.dumps({"steps": steps, "torch_threads": torch.get_num_threads()}))


# ---------------------------------------------------------------------------------------------- driver
def run_worker(mode: str, model_dir: str, work: Work, tmp: Path) -> dict[str, Any]:
    """One repetition of ``mode`` in a fresh subprocess, with its per-step records and their medians."""
    out = tmp / f"{mode}_{time.monotonic_ns()}.json"
    spec = {"mode": mode, "model_dir": model_dir, "work": asdict(work), "out": str(out)}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {mode} on {model_dir} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["process_seconds"] = time.perf_counter() - start
    timed = result["steps"][1:]
    result["summary"] = {k: statistics.median(s[k] for s in timed) for k in timed[0] if k != "peak_rss_mb"} | {
        "rest_seconds": statistics.median(s["seconds"] - s["generate_seconds"] for s in timed),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in result["steps"]),
        "warmup_seconds": result["steps"][0]["seconds"],
    }
    return result


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def _fmt(x: dict[str, Any] | None) -> str:
    return "-" if x is None else f"{x['median']:.2f}x ({x['min']:.2f}-{x['max']:.2f})"


def _ratio(
    numerator: list[dict[str, Any]], denominator: list[dict[str, Any]], num_key: str, den_key: str | None
) -> dict[str, Any]:
    """Per repetition, (num_key / den_key) of one mode's summary over the other's (median and range); with no
    ``den_key``, num_key alone."""

    def value(summary: dict[str, float]) -> float:
        return summary[num_key] / (summary[den_key] if den_key else 1.0)

    pairs = zip(numerator, denominator, strict=True)
    return _spread([value(a["summary"]) / value(b["summary"]) for a, b in pairs])


def ratios(per_mode: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """spiral_lit/TRL per repetition (median and range over repetitions), and SPIRAL/GRPO seconds per token."""
    grpo = per_mode["spiral_lit"]
    out = {
        key: _ratio(grpo, per_mode["trl"], key, None)
        for key in ("tokens_per_s", "generate_tokens_per_s", "seconds", "peak_rss_mb")
    }
    if per_mode.get("trl_keep_freed"):
        out["tokens_per_s_vs_trl_keep_freed"] = _ratio(grpo, per_mode["trl_keep_freed"], "tokens_per_s", None)
    if spiral := per_mode.get("spiral"):
        out["spiral_s_per_token_vs_grpo"] = _ratio(spiral, grpo, "seconds", "generated_tokens")
        # Why SPIRAL costs more per generated token: it trains on more tokens per generated token (each aggregation
        # prompt holds 4 candidates); the update's seconds per trained token show whether either is less efficient.
        out["spiral_trained_tokens_vs_grpo"] = _ratio(spiral, grpo, "trained_tokens", None)
        out["spiral_update_s_per_trained_token_vs_grpo"] = _ratio(spiral, grpo, "update_seconds", "trained_tokens")
    return out


def report(results: dict[str, dict[str, list[dict[str, Any]]]], settings: dict[str, Any], out: Path) -> None:
    """Tables to stdout; settings, ratios and every step to ``out``."""
    names = {
        "spiral_lit": "spiral_lit GRPO",
        "trl": "TRL GRPO",
        "trl_keep_freed": "TRL GRPO, malloc keeps freed memory",
        "spiral": "spiral_lit SPIRAL",
    }
    print("\n| model | run | s/step | generated tok/s | generation tok/s | rest of step (s) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for model, per_mode in results.items():
        for mode, reps in per_mode.items():
            s = {k: statistics.median(r["summary"][k] for r in reps) for k in reps[0]["summary"]}
            print(
                f"| {model} | {names[mode]} | {s['seconds']:.2f} | {s['tokens_per_s']:.0f} | "
                f"{s['generate_tokens_per_s']:.0f} | {s['rest_seconds']:.2f} | {s['peak_rss_mb']:.0f} |"
            )
    all_ratios = {model: ratios(per_mode) for model, per_mode in results.items()}
    print(
        "\n| model | spiral_lit/TRL generated tok/s | generation phase | peak RSS | SPIRAL/GRPO s per token "
        "| spiral_lit/TRL generated tok/s, TRL's malloc keeping freed memory |"
    )
    print("|---|---|---|---|---|---|")
    for model, r in all_ratios.items():
        cells = (r["tokens_per_s"], r["generate_tokens_per_s"], r["peak_rss_mb"], r.get("spiral_s_per_token_vs_grpo"),
                 r.get("tokens_per_s_vs_trl_keep_freed"))  # fmt: skip
        print(f"| {model} | " + " | ".join(_fmt(c) for c in cells) + " |")
    for model, per_mode in results.items():
        if per_mode.get("spiral"):
            for mode in ("spiral_lit", "spiral"):
                s = {k: statistics.median(r["summary"][k] for r in per_mode[mode]) for k in ("trained_tokens",
                     "update_seconds", "generated_tokens", "generate_seconds")}  # fmt: skip
                update_us = 1e6 * s["update_seconds"] / s["trained_tokens"]
                generate_us = 1e6 * s["generate_seconds"] / s["generated_tokens"]
                print(
                    f"{model} {names[mode]}: trains on {s['trained_tokens']:.0f} tokens per step for "
                    f"{s['generated_tokens']:.0f} generated; update {update_us:.1f} us per trained token, "
                    f"generation {generate_us:.1f} us per generated token"
                )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "ratios": all_ratios, "results": results}, indent=2))
    print(f"wrote {out} ({settings['wall_seconds']:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_SIZES), choices=list(MODEL_SIZES))
    parser.add_argument(
        "--spiral-models",
        nargs="*",
        default=["tiny"],
        choices=list(MODEL_SIZES),
        help="models SPIRAL mode also runs on (a 50m SPIRAL step takes minutes on 2 cores)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per framework and model")
    parser.add_argument("--steps", type=int, default=Work.steps, help="timed steps per process, after a warm-up")
    parser.add_argument("--prompts", type=int, default=Work.prompts)
    parser.add_argument("--generations", type=int, default=Work.generations)
    parser.add_argument("--max-tokens", type=int, default=Work.max_tokens)
    parser.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's)")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default=Work.precision,
                        help="both frameworks: fp32, or bf16 autocast with fp32 weights (TRL: bf16=True)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 4 prompts, 1 repeat, 1 step")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/vs_trl.json"))
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(json.loads(args.worker))
        return
    if args.quick:
        args.models, args.spiral_models, args.prompts, args.repeats, args.steps = ["tiny"], ["tiny"], 4, 1, 1
    work = Work(args.prompts, args.generations, args.max_tokens, args.steps, threads=args.threads,
                precision=args.precision)  # fmt: skip
    start = time.perf_counter()
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models, tokenizer = build_models(args.models)
        for model_name, model in models.items():
            model_dir = tmp / model_name
            model.save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
            modes = [m for m in MODES if m != "spiral" or model_name in args.spiral_models]
            results[model_name] = {m: [] for m in modes}
            n_params = sum(p.numel() for p in model.parameters())
            print(f"model {model_name}: {n_params / 1e6:.2f}M parameters", flush=True)
            for repeat in range(args.repeats):
                for mode in modes if repeat % 2 == 0 else reversed(modes):
                    result = run_worker(mode, str(model_dir), work, tmp)
                    results[model_name][mode].append(result)
                    s = result["summary"]
                    print(
                        f"  rep {repeat} {mode:<14} {s['seconds']:7.2f} s/step {s['tokens_per_s']:6.0f} tok/s "
                        f"(generation {s['generate_tokens_per_s']:6.0f} tok/s, rest {s['rest_seconds']:6.2f} s) "
                        f"peak RSS {s['peak_rss_mb']:5.0f} MB, warm-up {s['warmup_seconds']:.2f} s",
                        flush=True,
                    )
    threads = sorted({r["torch_threads"] for per_mode in results.values() for reps in per_mode.values() for r in reps})
    settings = asdict(work) | {
        "repeats": args.repeats,
        "spiral_shape": {"n_search": work.generations, "n_sets": N_SETS, "set_size": SET_SIZE, "n_agg": N_AGG},
        "torch_threads": threads,
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "versions": {pkg: version(pkg) for pkg in ("torch", "transformers", "lightning", "trl")},
        "wall_seconds": time.perf_counter() - start,
    }
    report(results, settings, args.out)


if __name__ == "__main__":
    main()
