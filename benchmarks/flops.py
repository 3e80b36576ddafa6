"""A FLOP/s account of a SPIRAL and a GRPO step: every phase's achieved FLOP/s against this machine's GEMM peak.

Run: ``python benchmarks/flops.py`` (tiny and 50m, SPIRAL and GRPO, fp32 and bf16-mixed; ~15 min on 2 quiet
cores); ``--sizes tiny --steps 1`` for a quick look. Prints tables and writes JSON (``--out``).

Peaks: the best of square ``torch.mm`` products (1024, 2048 and 4096 wide, fp32 and bf16), measured at the start
and again at the end of the run; the higher of the two is the peak (the CPU's clock moves with its load).

Work: one step as ``SpiralModule.training_step`` runs it, with the same functions as ``train_step.py``: search
traces, sets, aggregation traces (SPIRAL only), then the update over every trace: the training forward through the
shared-prefix path (``update.shared_prefix: true``, the default: each distinct prompt encoded once), the backward,
gradient clipping and AdamW. ``--prompts`` chain-sum problems x ``--n-search`` search traces, for SPIRAL
``--n-sets`` sets of ``--set-size`` with ``--n-agg`` aggregation traces each, ``--max-new-tokens`` tokens per trace:
one ``lm_head`` hook bans EOS so every trace runs to the budget. Models: random weights, the quickstart's tiny
Llama or the ~50M one (``train_step.py``'s sizes). bf16-mixed = bf16 autocast around the whole step with fp32 weights
and optimiser state, as ``trainer.precision: bf16-mixed`` runs it. Each step runs every (algorithm, precision) pair
on the same problems in an order that flips every step; the first step is a warm-up and is not counted.

Phases and their FLOPs, counted from the shapes (useful work only: padding, masking and recomputation are not
counted, so a phase that wastes work shows it as a lower FLOP/s):

- prefill: the rollout engine's forward over the distinct prompts (timed by wrapping ``KVCacheEngine._prefill``):
  every prompt token's matmuls and causal attention, and the last position's logits;
- decode: the rest of ``generate``: one forward per generated token after the first, each attending to the prompt
  and the tokens before it, with its logits;
- forward: the training forward: each distinct prompt once, every completion token, logits at every completion
  position;
- backward: twice the training forward's FLOPs (the usual count: gradients for activations and for weights);
- optimiser: gradient-norm clipping and AdamW, counted as 14 FLOPs per parameter. It moves ~16 bytes per parameter
  for those few FLOPs, so it is memory-bound and its share of the GEMM peak says little.

A token's forward costs 2 x (its matmul parameters) + 4 x layers x hidden x (positions it attends to) + (logits:
2 x vocabulary x hidden where they are computed). The matching peak is bf16's for every phase of a bf16-mixed step
except the optimiser, which runs in fp32.

Cost per token (``--out`` JSON ``costs``): the whole step's seconds per generated token and per trained token,
where trained tokens = each distinct prompt once plus every completion token (what the update's forward encodes),
for both algorithms at each size and precision.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))  # run as a script: train_step.py sits beside this file

from rollout import ban_eos  # noqa: E402
from train_step import SIZES, add_step_arguments, update_seconds  # noqa: E402

from spiral_lit.algorithms import grpo_advantages, sample_sets_batch, spiral_advantages  # noqa: E402
from spiral_lit.prompts import PromptConfig  # noqa: E402
from spiral_lit.rollout.base import SamplingConfig  # noqa: E402
from spiral_lit.runtime.models import PolicyConfig, build_tiny_policy  # noqa: E402
from spiral_lit.runtime.policy import PolicyRuntime, VerifierConfig  # noqa: E402
from spiral_lit.scaffolds import sample_aggregations, sample_search  # noqa: E402
from spiral_lit.tasks import ChainSumTask  # noqa: E402
from spiral_lit.tools.tiny import tokenizer_corpus  # noqa: E402
from spiral_lit.training.experience import aggregation_sequences, search_sequences  # noqa: E402
from spiral_lit.training.update import TrainSequence  # noqa: E402

PHASES = ("prefill", "decode", "forward", "backward", "optimizer")
PRECISIONS = ("32-true", "bf16-mixed")
OPTIMIZER_FLOPS_PER_PARAM = 14  # clip (square, sum, scale: 3) + AdamW (moments 5, bias-corrected step 6)


@dataclass(frozen=True)
class Shape:
    """What the FLOP count needs of a decoder-only transformer's config."""

    layers: int
    hidden: int
    matmul_params: int
    """Parameters of the matmuls a token goes through in all layers (attention projections and MLP)."""
    vocab: int

    @classmethod
    def of(cls, config: Any) -> Shape:
        d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or d // heads
        attention = d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d
        mlp = 3 * d * config.intermediate_size
        return cls(config.num_hidden_layers, heads * head_dim, config.num_hidden_layers * (attention + mlp),
                   config.vocab_size)  # fmt: skip

    def tokens(self, n_tokens: int, attended: int, logits: int) -> int:
        """FLOPs of ``n_tokens`` token forwards that attend to ``attended`` positions in all, with ``logits``
        logit rows."""
        matmuls, attention = 2 * self.matmul_params * n_tokens, 4 * self.layers * self.hidden * attended
        return matmuls + attention + 2 * self.vocab * self.hidden * logits


def causal_positions(start: int, n: int) -> int:
    """Positions attended to by tokens ``start+1 .. start+n`` (1-based) under a causal mask, themselves included."""
    return n * start + n * (n + 1) // 2


def prefill_flops(shape: Shape, prompt_lengths: Sequence[int]) -> int:
    """The engine's prefill: each distinct prompt encoded, logits at its last position."""
    return sum(shape.tokens(n, causal_positions(0, n), 1) for n in prompt_lengths)


def decode_flops(shape: Shape, rows: Sequence[tuple[int, int]]) -> int:
    """(prompt length, generated tokens) per row: every generated token but the last is fed back once."""
    return sum(shape.tokens(g - 1, causal_positions(p + 1, g - 1), g - 1) for p, g in rows if g > 1)


def forward_flops(shape: Shape, sequences: Sequence[TrainSequence]) -> int:
    """The shared-prefix training forward: each distinct prompt once, every completion token after it."""
    prompts = {tuple(s.prompt_ids) for s in sequences}
    flops = sum(shape.tokens(len(p), causal_positions(0, len(p)), 0) for p in prompts)
    for s in sequences:
        p, c = len(s.prompt_ids), s.completion.num_tokens
        flops += shape.tokens(c, causal_positions(p, c), c)  # logits: last prompt position + c - 1 completion ones
    return flops


def trained_tokens(sequences: Sequence[TrainSequence]) -> int:
    """Each distinct prompt once plus every completion token: what the update's forward encodes."""
    prompts = {tuple(s.prompt_ids) for s in sequences}
    return sum(len(p) for p in prompts) + sum(s.completion.num_tokens for s in sequences)


def gemm_peaks(sizes: Sequence[int] = (1024, 2048, 4096), repeats: int = 3) -> dict[str, float]:
    """Best GFLOP/s of square ``torch.mm`` in fp32 and bf16."""
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for n in sizes:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            torch.mm(a, b)  # warm-up
            for _ in range(repeats):
                start = time.perf_counter()
                torch.mm(a, b)
                best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
        peaks[name] = best
    return peaks


class PrefillTimer:
    """Seconds spent in the engine's prefill, by wrapping the instance's ``_prefill``."""

    def __init__(self, engine: Any) -> None:
        self.seconds = 0.0
        self.prompt_lengths: list[int] = []
        inner: Callable[..., Any] = engine._prefill

        def timed(prompts: list[tuple[int, ...]]) -> Any:
            start = time.perf_counter()
            out = inner(prompts)
            self.seconds += time.perf_counter() - start
            self.prompt_lengths.extend(len(p) for p in prompts)
            return out

        engine._prefill = timed

    def reset(self) -> None:
        self.seconds, self.prompt_lengths = 0.0, []


def one_step(rt: PolicyRuntime, timer: PrefillTimer, optimizer: torch.optim.Optimizer, args: argparse.Namespace,
             step: int, algorithm: str, precision: str) -> dict[str, Any]:  # fmt: skip
    """One step of ``algorithm`` under ``precision``: seconds and FLOPs per phase, tokens."""
    shape = Shape.of(rt.model.config)
    problems = [rt.task.problem(step * args.prompts + i, "train") for i in range(args.prompts)]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    keep = torch.ones(len(problems), dtype=torch.bool)
    timer.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        start = time.perf_counter()
        search = sample_search(rt.engine, rt.renderer, problems, args.n_search, sampling, seed=step)
        if algorithm == "spiral":
            generator = torch.Generator().manual_seed(step)
            sets_BKS = sample_sets_batch(len(problems), args.n_search, args.n_sets, args.set_size, generator)
            agg = sample_aggregations(rt.engine, rt.renderer, problems, search.traces, sets_BKS, args.n_agg,
                                      sampling, step)  # fmt: skip
        generate = time.perf_counter() - start
        # Random weights never answer: every advantage is 0, the same work as any other.
        if algorithm == "spiral":
            search_adv, agg_adv = spiral_advantages(torch.zeros(len(problems), args.n_sets, args.n_agg), sets_BKS,
                                                    args.n_search)  # fmt: skip
            sequences = search_sequences(search, search_adv, keep) + aggregation_sequences(agg, agg_adv, keep)
        else:
            sequences = search_sequences(search, grpo_advantages(torch.zeros(len(problems), args.n_search)), keep)
        decode_rows = [(len(s.prompt_ids), s.completion.num_tokens) for s in sequences]
        optimizer.zero_grad(set_to_none=True)
        update = update_seconds(rt, sequences, args, "on")
    start = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(rt.model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = {"prefill": timer.seconds, "decode": generate - timer.seconds, "forward": update["logprobs"],
               "backward": update["backward"], "optimizer": time.perf_counter() - start}  # fmt: skip
    forward = forward_flops(shape, sequences)
    params = sum(p.numel() for p in rt.model.parameters())
    flops = {"prefill": prefill_flops(shape, timer.prompt_lengths), "decode": decode_flops(shape, decode_rows),
             "forward": forward, "backward": 2 * forward, "optimizer": OPTIMIZER_FLOPS_PER_PARAM * params}  # fmt: skip
    return {"seconds": seconds, "flops": flops, "generated_tokens": sum(g for _, g in decode_rows),
            "trained_tokens": trained_tokens(sequences)}  # fmt: skip


def run_size(size: str, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Every (algorithm, precision) pair at ``size``, steps interleaved; the warm-up step dropped."""
    task = ChainSumTask(n_terms=4, digits=2)
    pairs = [(a, p) for a in args.algorithms for p in args.precisions]
    runs: dict[str, list[dict[str, Any]]] = {f"{a}/{p}": [] for a, p in pairs}
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_policy(tmp, tokenizer_corpus(task, PromptConfig(), 500), SIZES[size])
        rt = PolicyRuntime(PolicyConfig(tmp), task, PromptConfig(), VerifierConfig(num_workers=1))
        ban_eos(rt.model, rt.tokenizer.eos_token_id)
        rt.model.train()
        timer = PrefillTimer(rt.engine)
        optimizer = torch.optim.AdamW(rt.model.parameters(), lr=1e-6)
        for step in range(args.steps + 1):
            for algorithm, precision in pairs if step % 2 == 0 else pairs[::-1]:
                started = time.perf_counter()
                result = one_step(rt, timer, optimizer, args, step, algorithm, precision)
                runs[f"{algorithm}/{precision}"].append(result)
                print(f"[flops] {size} {algorithm} {precision} step {step}: {time.perf_counter() - started:.1f} s",
                      flush=True)  # fmt: skip
        rt.close()
    return {key: steps[1:] for key, steps in runs.items()}


def summarise(steps: list[dict[str, Any]], peaks: dict[str, float], precision: str) -> dict[str, Any]:
    """Median seconds per phase, FLOP/s and fraction of the matching peak; step costs per token."""
    rows = {}
    for phase in PHASES:
        seconds = statistics.median(s["seconds"][phase] for s in steps)
        flops = statistics.median(s["flops"][phase] for s in steps)
        peak = peaks["bf16" if precision == "bf16-mixed" and phase != "optimizer" else "fp32"]
        gflops = flops / seconds / 1e9 if seconds > 0 else 0.0
        rows[phase] = {"seconds": seconds, "gflop": flops / 1e9, "gflop_per_s": gflops, "of_peak": gflops / peak}
    step_seconds = statistics.median(sum(s["seconds"].values()) for s in steps)
    generated = statistics.median(s["generated_tokens"] for s in steps)
    trained = statistics.median(s["trained_tokens"] for s in steps)
    return {"phases": rows, "step_seconds": step_seconds, "generated_tokens": generated, "trained_tokens": trained,
            "us_per_generated_token": step_seconds / generated * 1e6,
            "us_per_trained_token": step_seconds / trained * 1e6}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=tuple(SIZES), default=list(SIZES))
    parser.add_argument("--algorithms", nargs="+", choices=("spiral", "grpo"), default=["spiral", "grpo"])
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--steps", type=int, default=2, help="timed steps per pair, after a warm-up step")
    add_step_arguments(parser, max_new_tokens=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/flops.json"))
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    peaks_before = gemm_peaks()
    runs = {size: run_size(size, args) for size in args.sizes}
    peaks_after = gemm_peaks()
    peaks = {k: max(peaks_before[k], peaks_after[k]) for k in peaks_before}
    print(f"\nGEMM peak GFLOP/s ({torch.get_num_threads()} threads): fp32 {peaks['fp32']:.0f} "
          f"(start {peaks_before['fp32']:.0f}, end {peaks_after['fp32']:.0f}), bf16 {peaks['bf16']:.0f} "
          f"(start {peaks_before['bf16']:.0f}, end {peaks_after['bf16']:.0f})")  # fmt: skip
    summary: dict[str, dict[str, Any]] = {}
    print(f"\n| model | step | precision | {' | '.join(PHASES)} | step s |")
    print("|---|---|---|" + "---|" * len(PHASES) + "---|")
    for size, by_pair in runs.items():
        for pair, steps in by_pair.items():
            algorithm, precision = pair.split("/")
            row = summarise(steps, peaks, precision)
            summary[f"{size}/{pair}"] = row
            cells = [f"{row['phases'][p]['gflop_per_s']:.0f} GF/s ({row['phases'][p]['of_peak']:.0%}, "
                     f"{row['phases'][p]['seconds']:.2f} s)" for p in PHASES]  # fmt: skip
            print(f"| {size} | {algorithm} | {precision} | {' | '.join(cells)} | {row['step_seconds']:.2f} |")
    print("\n| model | precision | step | generated tokens | trained tokens | us/generated token | us/trained token |")
    print("|---|---|---|---|---|---|---|")
    costs = {}
    for size in runs:
        for precision in args.precisions:
            for algorithm in args.algorithms:
                row = summary[f"{size}/{algorithm}/{precision}"]
                print(f"| {size} | {precision} | {algorithm} | {row['generated_tokens']:.0f} "
                      f"| {row['trained_tokens']:.0f} | {row['us_per_generated_token']:.1f} "
                      f"| {row['us_per_trained_token']:.1f} |")  # fmt: skip
            if set(args.algorithms) == {"spiral", "grpo"}:
                s, g = summary[f"{size}/spiral/{precision}"], summary[f"{size}/grpo/{precision}"]
                costs[f"{size}/{precision}"] = {
                    "spiral_over_grpo_per_trained_token": s["us_per_trained_token"] / g["us_per_trained_token"],
                    "spiral_over_grpo_per_generated_token": s["us_per_generated_token"] / g["us_per_generated_token"],
                }
    for key, ratio in costs.items():
        print(f"{key}: SPIRAL/GRPO per trained token {ratio['spiral_over_grpo_per_trained_token']:.2f}x, "
              f"per generated token {ratio['spiral_over_grpo_per_generated_token']:.2f}x")  # fmt: skip
    if "32-true" in args.precisions and "bf16-mixed" in args.precisions:
        for size in runs:
            for algorithm in args.algorithms:
                fp32, bf16 = (summary[f"{size}/{algorithm}/{p}"]["step_seconds"] for p in PRECISIONS)
                print(f"{size} {algorithm}: fp32 / bf16-mixed step time {fp32 / bf16:.2f}x")
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "threads": torch.get_num_threads(),
              "peaks_gflop_per_s": {"best": peaks, "start": peaks_before, "end": peaks_after},
              "summary": summary, "costs": costs, "steps": runs}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
