"""One warm-start step of the quickstart, with today's micro-batch cut against filling each micro-batch in turn.

Run: ``python benchmarks/warm_start_step.py --model runs/quickstart/warmstart_search/hf --steps 10``
(without ``--model`` it builds the quickstart's tiny model with random weights in a temp dir; the step's cost does
not depend on the weights). Prints a table and writes JSON (``--out``).

A step is what ``WarmStartModule.training_step`` runs, with the same functions: the quickstart's countdown
examples of both roles (``warm_start_examples``), micro-batches, the full forward (under bf16 autocast with
``--precision bf16-mixed``; by default the precision this CPU runs faster, as the quickstart's ``run.sh`` picks it,
since emulated bf16 is ~100x slower), token-mean cross-entropy, backward, AdamW. Task, prompts, example mix, problems
a step and micro-batch limits are read from ``--config`` (the quickstart's ``warmstart.yaml``). Both cuts run every
step on the same examples, in alternating order, one process (side by side); the first step is a warm-up and is not
counted.
``fill`` is the cut ``length_buckets`` made before: each row joins the current micro-batch while it fits.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from spiral_lit.prompts import PromptConfig, PromptRenderer
from spiral_lit.runtime.cpu_precision import bf16_speedup, faster_precision
from spiral_lit.runtime.models import TinyModelConfig, build_tiny_policy
from spiral_lit.tasks import CountdownTask
from spiral_lit.tools.tiny import tokenizer_corpus
from spiral_lit.training.batching import length_buckets, pack
from spiral_lit.training.forward import full_logits
from spiral_lit.training.warm_start import warm_start_examples


def fill_in_turn(lengths: Sequence[int], micro_batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """The former cut: rows longest first, each joining the current micro-batch while it fits."""
    buckets: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = bool(buckets) and len(buckets[-1]) < micro_batch_size
        if fits and (max_tokens is None or (len(buckets[-1]) + 1) * lengths[buckets[-1][0]] <= max_tokens):
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


CUTS = {"dp": length_buckets, "fill": fill_in_turn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a saved policy directory (default: the tiny model, random weights)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--config", default="experiments/quickstart/warmstart.yaml", help="a countdown warm start")
    parser.add_argument("--out", default="benchmarks/warm_start_step.json")
    parser.add_argument("--precision", choices=["bf16-mixed", "32-true"], help="default: the faster on this CPU")
    args = parser.parse_args()
    precision = args.precision or faster_precision(bf16_speedup())

    config = yaml.safe_load(Path(args.config).read_text())
    module, problems_per_step = config["model"]["init_args"], config["data"]["batch_size"]
    task = CountdownTask(**config["data"]["task"]["init_args"])
    prompt_config = PromptConfig(**module.get("prompts", {}))
    mix = (module["set_size"], module["search_fraction"], module["aggregation_fraction"])
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            path = str(Path(tmp) / "tiny")
            corpus = tokenizer_corpus(task, prompt_config, 2000)
            build_tiny_policy(path, corpus, TinyModelConfig(vocab_size=512))
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    model.train()
    renderer = PromptRenderer(tokenizer, prompt_config, task.answer_instruction)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    pad_id = tokenizer.pad_token_id

    def step(prompts: list[list[int]], targets: list[list[int]], cut: str) -> tuple[float, int, int]:
        """(seconds, padded tokens, micro-batches) of one step with ``cut``."""
        start = time.perf_counter()
        lengths = [len(p) + len(t) for p, t in zip(prompts, targets, strict=True)]
        buckets = CUTS[cut](lengths, module["micro_batch_size"], module["micro_batch_tokens"])
        normaliser = sum(len(t) for t in targets)
        padded = 0
        for rows in buckets:
            batch = pack([prompts[i] for i in rows], [targets[i] for i in rows], pad_id)
            padded += batch.input_ids_BT.numel()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                logits = full_logits(model, batch)
            nll = F.cross_entropy(logits.float().transpose(1, 2), batch.targets_BT1, reduction="none")
            ((nll * batch.completion_mask_BT1).sum() / normaliser).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start, padded, len(buckets)

    runs: dict[str, list[tuple[float, int, int]]] = {cut: [] for cut in CUTS}
    real: list[int] = []
    for s in range(args.steps + 1):
        problems = [task.problem(problems_per_step * s + j, "train") for j in range(problems_per_step)]
        prompts, targets, _ = warm_start_examples(problems, task, renderer, *mix, random.Random(s))
        order = list(CUTS) if s % 2 == 0 else list(reversed(CUTS))
        for cut in order:
            result = step(prompts, targets, cut)
            if s > 0:  # the first step is a warm-up
                runs[cut].append(result)
        if s > 0:
            real.append(sum(len(p) + len(t) for p, t in zip(prompts, targets, strict=True)))

    rows = {}
    for cut, results in runs.items():
        seconds = [r[0] for r in results]
        rows[cut] = {
            "s_per_step_median": statistics.median(seconds),
            "s_per_step_min": min(seconds),
            "s_per_step_max": max(seconds),
            "padded_over_real_tokens": sum(r[1] for r in results) / sum(real),
            "micro_batches_per_step": statistics.mean(r[2] for r in results),
        }
    ratios = [f / d for (f, *_), (d, *_) in zip(runs["fill"], runs["dp"], strict=True)]
    summary = {
        "model": args.model or "tiny (random weights)",
        "steps": args.steps,
        "config": args.config,
        "problems_per_step": problems_per_step,
        "real_tokens_per_step": statistics.mean(real),
        "threads": torch.get_num_threads(),
        "precision": precision,
        "cuts": rows,
        "speedup_dp_over_fill_median": statistics.median(ratios),
        "speedup_dp_over_fill_range": [min(ratios), max(ratios)],
    }
    print(
        f"{problems_per_step} problems a step, {summary['real_tokens_per_step']:.0f} tokens, {precision}, "
        f"{summary['threads']} threads"
    )
    print(f"{'cut':6s} {'s/step (median, range)':>26s} {'padded/real':>12s} {'micro-batches':>14s}")
    for cut, row in rows.items():
        span = f"{row['s_per_step_median']:.3f} ({row['s_per_step_min']:.3f}-{row['s_per_step_max']:.3f})"
        print(f"{cut:6s} {span:>26s} {row['padded_over_real_tokens']:12.2f} {row['micro_batches_per_step']:14.2f}")
    low, high = summary["speedup_dp_over_fill_range"]
    print(f"dp over fill: {summary['speedup_dp_over_fill_median']:.2f}x per step (range {low:.2f}-{high:.2f})")
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
