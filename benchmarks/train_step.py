"""Where one SPIRAL (or GRPO) step spends its time: seconds per phase and the share of each.

Run: ``python benchmarks/train_step.py --model runs/quickstart/warmstart/hf --steps 5``
(without ``--model`` it builds the quickstart's tiny model with random weights in a temp dir).
``--algorithm grpo`` trains on the search traces only (no sets, no aggregation).
Prints a table and writes JSON (``--out``).

Phases, as ``SpiralModule.training_step`` runs them, with the same functions:
generate (search traces, sets, aggregation traces), verify, log-probs (the training
forward pass), backward, optimiser step. The update is timed per phase here, which
``PolicyUpdater`` fuses per micro-batch; its arithmetic is the same. The first step is
a warm-up and is not counted.

``--precision bf16-mixed`` runs each step under bf16 autocast, as ``trainer.precision: bf16-mixed`` does (fp32
weights and optimiser); ``--precision both`` runs every step in fp32 and in bf16-mixed on the same problems, in
alternating order, and reports the ratio (one process, side by side). ``--size 50m`` builds the benchmarks' ~50M
Llama (hidden 512, 12 layers) instead of the tiny one.

``--shared-prefix both`` (the default) runs the update of every step twice on the same traces, with
``update.shared_prefix`` off and on (each distinct prompt encoded once: spiral_lit/fastpath/fused_prefix.py on CPU, as
``PolicyUpdater`` runs it, else spiral_lit/training/prefix_forward.py), in
alternating order, and reports both; the phase table shows the ``on`` run. ``--shared-prefix fused_vs_model`` compares
the ``on`` run with ``model``: the shared prefix through the model's own forward (the path a model that the fused
forward refuses takes). ``--lora-rank R`` trains rank-R adapters (alpha 2R, every projection) as ``policy.lora`` does,
e.g. ``--model runs/smollm2/warmstart/hf --lora-rank 16`` for the SmolLM2 recipe's update.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from spiral_lit.algorithms import grpo_advantages, policy_loss, sample_sets_batch, spiral_advantages, token_logprobs
from spiral_lit.fastpath.fused_prefix import fused_prefix_logits, fused_prefix_refusal
from spiral_lit.prompts import PromptConfig
from spiral_lit.rollout.base import SamplingConfig
from spiral_lit.runtime.lora import LoraSettings
from spiral_lit.runtime.models import PolicyConfig, TinyModelConfig, build_tiny_policy
from spiral_lit.runtime.policy import PolicyRuntime, VerifierConfig
from spiral_lit.scaffolds import sample_aggregations, sample_search
from spiral_lit.tasks import ChainSumTask
from spiral_lit.tools.tiny import tokenizer_corpus
from spiral_lit.training.batching import length_buckets, pack, prefix_buckets
from spiral_lit.training.experience import aggregation_sequences, search_sequences
from spiral_lit.training.prefix_forward import cache_forward, pack_shared_prefix, shared_prefix_logits
from spiral_lit.training.update import TrainSequence

PHASES = ("generate", "verify", "logprobs", "backward", "optimizer")
PRECISIONS = {"32-true": ("32-true",), "bf16-mixed": ("bf16-mixed",), "both": ("32-true", "bf16-mixed")}
SIZES = {
    "tiny": TinyModelConfig(),
    "50m": TinyModelConfig(hidden_size=512, intermediate_size=2048, num_layers=12, num_heads=8),
}


def step_in_precision(rt: PolicyRuntime, optimizer: torch.optim.Optimizer, args: argparse.Namespace, step: int,
                      precision: str) -> dict:  # fmt: skip
    """:func:`one_step` under ``precision``: bf16-mixed is bf16 autocast around the whole step, as Lightning's
    precision plugin wraps ``training_step``."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        return one_step(rt, optimizer, args, step)


MODES = {"on": ("on",), "off": ("off",), "both": ("off", "on"), "fused_vs_model": ("model", "on")}


def update_seconds(rt: PolicyRuntime, sequences: list[TrainSequence], args: argparse.Namespace, mode: str) -> dict:
    """Forward and backward seconds of the update over ``sequences`` (gradients accumulate into the model).

    ``mode``: ``off`` full rows; ``on`` the shared prefix as ``PolicyUpdater`` runs it; ``model`` the shared prefix
    through the model's own forward."""
    shared = mode != "off"
    seconds = {"logprobs": 0.0, "backward": 0.0}
    pad = rt.tokenizer.pad_token_id
    n_tokens = torch.tensor(float(sum(s.completion.num_tokens for s in sequences)))
    if shared:
        forward = cache_forward(rt.model)
        prompts, lengths = [s.prompt_ids for s in sequences], [s.completion.num_tokens for s in sequences]
        buckets = prefix_buckets(prompts, lengths, args.micro_batch_size, args.micro_batch_tokens)
    else:
        lengths = [len(s.prompt_ids) + s.completion.num_tokens for s in sequences]
        buckets = length_buckets(lengths, args.micro_batch_size, args.micro_batch_tokens)
    for rows in buckets:
        chosen = [sequences[i] for i in rows]
        inputs = ([s.prompt_ids for s in chosen], [s.completion.token_ids for s in chosen], pad,
                  {"old": [s.completion.logprobs for s in chosen]})  # fmt: skip
        t = time.perf_counter()
        if shared:
            batch = pack_shared_prefix(*inputs)
            # As PolicyUpdater: the written-out forward without per-row prompt copies where it applies (CPU).
            fused = mode == "on" and fused_prefix_refusal(rt.model) is None
            logits = fused_prefix_logits(rt.model, batch) if fused else shared_prefix_logits(rt.model, batch, forward)
        else:
            batch = pack(*inputs)
            logits = rt.model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits[:, :-1]
        logp = token_logprobs(logits, batch.targets_BT1)
        adv = torch.tensor([s.advantage for s in chosen])
        # normaliser = kept tokens of the whole step, as PolicyUpdater computes it
        loss, _ = policy_loss(logp, batch.values_BT1["old"], adv, batch.completion_mask_BT1, n_tokens)
        seconds["logprobs"] += time.perf_counter() - t
        t = time.perf_counter()
        loss.backward()
        seconds["backward"] += time.perf_counter() - t
    return seconds


def one_step(rt: PolicyRuntime, optimizer: torch.optim.Optimizer, args: argparse.Namespace, step: int) -> dict:
    seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
    task = rt.task
    problems = [task.problem(step * args.prompts + i, "train") for i in range(args.prompts)]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    keep = torch.ones(len(problems), dtype=torch.bool)
    t = time.perf_counter()
    search = sample_search(rt.engine, rt.renderer, problems, args.n_search, sampling, seed=step)
    if args.algorithm == "grpo":
        seconds["generate"] = time.perf_counter() - t
        t = time.perf_counter()
        texts = [c.text for per_problem in search.traces for c in per_problem]
        result = rt.verifier.score([p for p in problems for _ in range(args.n_search)], texts)
        seconds["verify"] = time.perf_counter() - t
        search_adv = grpo_advantages(torch.tensor(result.rewards).view(len(problems), args.n_search))
        sequences = search_sequences(search, search_adv, keep)
    else:
        generator = torch.Generator().manual_seed(step)
        sets_BKS = sample_sets_batch(len(problems), args.n_search, args.n_sets, args.set_size, generator)
        agg = sample_aggregations(rt.engine, rt.renderer, problems, search.traces, sets_BKS, args.n_agg, sampling, step)
        seconds["generate"] = time.perf_counter() - t
        t = time.perf_counter()
        texts = [c.text for per_problem in agg.traces for per_set in per_problem for c in per_set]
        result = rt.verifier.score([p for p in problems for _ in range(args.n_sets * args.n_agg)], texts)
        rewards_BKA = torch.tensor(result.rewards).view(len(problems), args.n_sets, args.n_agg)
        seconds["verify"] = time.perf_counter() - t
        search_adv, agg_adv = spiral_advantages(rewards_BKA, sets_BKS, args.n_search)
        sequences = search_sequences(search, search_adv, keep) + aggregation_sequences(agg, agg_adv, keep)
    modes = MODES[args.shared_prefix]
    update = {}
    for mode in modes if step % 2 == 0 else modes[::-1]:  # alternate the order: neither mode always runs first
        optimizer.zero_grad(set_to_none=True)
        update[mode] = update_seconds(rt, sequences, args, mode)
    seconds.update(update[modes[-1]])
    t = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(rt.model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds["optimizer"] = time.perf_counter() - t
    generated = sum(s.completion.num_tokens for s in sequences)
    prompt_tokens = sum(len(s.prompt_ids) for s in sequences)
    distinct_prompt_tokens = sum(len(p) for p in {tuple(s.prompt_ids) for s in sequences})
    return {"seconds": seconds, "update_seconds": update, "generated_tokens": generated,
            "prompt_tokens": prompt_tokens, "distinct_prompt_tokens": distinct_prompt_tokens,
            "sequences": len(sequences)}  # fmt: skip


def add_step_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The step's shape (prompts, traces, sets, trace length) and micro-batching, shared with flops.py."""
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n-search", type=int, default=8)
    parser.add_argument("--n-sets", type=int, default=4)
    parser.add_argument("--set-size", type=int, default=4)
    parser.add_argument("--n-agg", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--micro-batch-size", type=int, default=128)
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=str, default=None, help="HF directory (default: a random tiny model)")
    parser.add_argument("--steps", type=int, default=5)
    add_step_arguments(parser, max_new_tokens=96)
    parser.add_argument("--algorithm", choices=("spiral", "grpo"), default="spiral")
    parser.add_argument("--shared-prefix", choices=tuple(MODES), default="both", help="update.shared_prefix")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="32-true")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny", help="model built when --model is not given")
    parser.add_argument("--lora-rank", type=int, default=None, help="train LoRA adapters of this rank (alpha 2x)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/train_step.json"))
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    task = ChainSumTask(n_terms=4, digits=2)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            build_tiny_policy(tmp, tokenizer_corpus(task, PromptConfig(), 500), SIZES[args.size])
            path = tmp
        lora = None if args.lora_rank is None else LoraSettings(rank=args.lora_rank, alpha=2.0 * args.lora_rank)
        rt = PolicyRuntime(PolicyConfig(path, lora=lora), task, PromptConfig(), VerifierConfig(num_workers=1))
        rt.model.train()
        optimizer = torch.optim.AdamW([q for q in rt.model.parameters() if q.requires_grad], lr=1e-6)
        precisions = PRECISIONS[args.precision]
        by_precision: dict[str, list[dict]] = {p: [] for p in precisions}
        for step in range(args.steps + 1):  # step 0 warms up every precision and is not counted
            for precision in precisions if step % 2 == 0 else precisions[::-1]:
                by_precision[precision].append(step_in_precision(rt, optimizer, args, step, precision))
        by_precision = {p: r[1:] for p, r in by_precision.items()}
        rt.close()
    if len(precisions) == 2:
        totals = {p: [sum(r["seconds"].values()) for r in by_precision[p]] for p in precisions}
        ratios = [a / b for a, b in zip(totals["32-true"], totals["bf16-mixed"], strict=True)]
        for p in precisions:
            phases = {ph: statistics.median(r["seconds"][ph] for r in by_precision[p]) for ph in PHASES}
            print(f"{p:<11} step median {statistics.median(totals[p]):.3f} s: "
                  + ", ".join(f"{ph} {v:.3f}" for ph, v in phases.items()))  # fmt: skip
        print(f"fp32 / bf16-mixed step time: median {statistics.median(ratios):.2f}x "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f}) over {args.steps} steps")  # fmt: skip
    runs = by_precision[precisions[-1]]
    median = {p: statistics.median(r["seconds"][p] for r in runs) for p in PHASES}
    total = sum(median.values())
    n_agg = args.n_sets * args.n_agg if args.algorithm == "spiral" else 0
    model = args.model or f"random {args.size}"
    print(f"model {model}; {args.algorithm}: {args.prompts} prompts x ({args.n_search} search + "
          f"{n_agg} aggregation) traces; median of {args.steps} steps; {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'phase':<10} {'seconds':>8} {'share':>7}")
    for phase in PHASES:
        print(f"{phase:<10} {median[phase]:8.3f} {median[phase] / total:7.1%}")
    print(f"{'total':<10} {total:8.3f}")
    tokens = statistics.median(r["generated_tokens"] for r in runs)
    print(f"generated tokens per step {tokens:.0f}; generate tokens/s {tokens / median['generate']:.0f}")
    prompt_tokens = statistics.median(r["prompt_tokens"] for r in runs)
    distinct = statistics.median(r["distinct_prompt_tokens"] for r in runs)
    print(f"prompt tokens per step {prompt_tokens:.0f}, of distinct prompts {distinct:.0f}")
    update = {}
    for mode in MODES[args.shared_prefix]:
        per_step = [sum(r["update_seconds"][mode].values()) for r in runs]
        update[mode] = {"median": statistics.median(per_step), "min": min(per_step), "max": max(per_step)}
        print(f"update (forward + backward), shared_prefix {mode:<5}: median {update[mode]['median']:.3f} s "
              f"(min {update[mode]['min']:.3f}, max {update[mode]['max']:.3f})")  # fmt: skip
    if len(update) == 2:
        slow = MODES[args.shared_prefix][0]
        ratios = [sum(r["update_seconds"][slow].values()) / sum(r["update_seconds"]["on"].values()) for r in runs]
        spread = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        update[f"speedup_{slow}_over_on"] = spread
        print(f"speed-up {slow}/on per step: median {statistics.median(ratios):.2f}x "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})")  # fmt: skip
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "threads": torch.get_num_threads(),
              "by_precision": by_precision,
              "median_seconds": median, "total": total, "share": {p: median[p] / total for p in PHASES},
              "update_seconds": update, "steps": runs}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
