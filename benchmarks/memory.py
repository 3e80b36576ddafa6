"""Peak memory of one policy-gradient training step on CPU, each memory feature on and off (docs/algorithm.md §8.3).

Run:  python benchmarks/memory.py                 # ~100M-parameter model, writes benchmarks/memory.json
      python benchmarks/memory.py --quick         # a small model, for checking the script (~1 minute)

The model has the quickstart tiny model's architecture (Llama, tied embeddings, the tiny
tokenizer's 320-token vocabulary) at hidden 768, 12 layers, intermediate 2560: 98.5M parameters,
random weights, written once with ``build_tiny_policy`` and read back through ``load_policy``
like any run. Every configuration runs in a fresh subprocess (so one's allocations cannot
hide another's) that loads the policy as ``PolicyRuntime`` does (gradient checkpointing from
``PolicyConfig``, LoRA through ``apply_lora``), builds the optimiser over the trainable
parameters, then runs one ``PolicyUpdater`` step (forward, backward per micro-batch, AdamW
step) over a fixed batch of sequences. The rollout is left out: it is the same with and without
these features.

Reported per configuration:
- ``peak_rss_mb``: the process's RSS high-water mark (``getrusage``; includes Python, torch and
  transformers, ~0.5 GB, and the load);
- ``step_peak_mb``: the highest RSS sampled every 2 ms during the step, minus the RSS just before
  it: what the step itself adds (activations, gradients, optimiser state created at the first step);
- tensor accounting after the step: bytes of parameters, gradients and optimiser state.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

CONFIGS: dict[str, dict] = {
    "baseline (fp32, AdamW)": {},
    "gradient checkpointing": {"gradient_checkpointing": True},
    "LoRA r=16": {"lora": True},
    "8-bit AdamW (bitsandbytes)": {"optimizer": "adamw8bit"},
    "bf16 weights": {"dtype": "bfloat16"},
    "LoRA + checkpointing + bf16": {"lora": True, "gradient_checkpointing": True, "dtype": "bfloat16"},
}
FULL = {"hidden_size": 768, "intermediate_size": 2560, "num_layers": 12, "num_heads": 12}
QUICK = {"hidden_size": 128, "intermediate_size": 384, "num_layers": 2, "num_heads": 4}


def _sequences(n: int, prompt_len: int, completion_len: int, vocab: int) -> list:
    from spiral_lit.rollout import Completion
    from spiral_lit.training.update import TrainSequence

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        ids = torch.randint(3, vocab, (completion_len,), generator=g).tolist()
        completion = Completion(ids, -torch.rand(completion_len, generator=g), "length", "")
        out.append(TrainSequence(prompt, completion, advantage=float(i % 3 - 1), role=i % 2))
    return out


class _RssSampler:
    """The highest RSS of this process seen by a thread polling every 2 ms."""

    def __init__(self) -> None:
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _bytes(tensors) -> int:  # noqa: ANN001 - any iterable of tensors
    return sum(t.numel() * t.element_size() for t in tensors)


def child(model_dir: str, config: dict, args: argparse.Namespace) -> dict:
    """One configuration in this (fresh) process."""
    from spiral_lit.runtime.lora import LoraSettings, apply_lora
    from spiral_lit.runtime.models import PolicyConfig, load_policy
    from spiral_lit.training.update import PolicyUpdater, UpdateConfig

    torch.set_num_threads(args.threads)
    policy = PolicyConfig(
        model_dir,
        dtype=config.get("dtype", "float32"),
        gradient_checkpointing=config.get("gradient_checkpointing", False),
    )
    model, tokenizer = load_policy(policy)
    if config.get("lora"):
        model = apply_lora(model, LoraSettings(rank=16, alpha=32.0))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.get("optimizer") == "adamw8bit":
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(trainable, lr=1e-5)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    update = UpdateConfig(micro_batch_size=args.micro_batch_size)
    updater = PolicyUpdater(model, update, tokenizer.pad_token_id, 1.0, lambda t: t, lambda t: t, world_size=1)
    sequences = _sequences(args.sequences, args.prompt_len, args.completion_len, len(tokenizer))

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()

    before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    with _RssSampler() as sampler:
        stats = updater.update(sequences, lambda loss: loss.backward(), step, torch.device("cpu"), seed=0)
    seconds = time.perf_counter() - start
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in trainable),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_step_mb": before / 2**20,
        "step_peak_mb": (sampler.peak - before) / 2**20,
        "param_mb": _bytes(model.parameters()) / 2**20,
        "grad_mb": _bytes(p.grad for p in trainable if p.grad is not None) / 2**20,
        "optimizer_state_mb": _bytes(state) / 2**20,
        "seconds": seconds,
        "loss_finite": bool(torch.isfinite(torch.tensor(stats["loss"]))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model and batch, to check the script")
    parser.add_argument("--sequences", type=int, default=None, help="sequences in the step (default 16; quick 4)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--completion-len", type=int, default=None, help="default 384; quick 64")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/memory.json; quick: none)")
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.sequences = args.sequences or (4 if args.quick else 16)
    args.completion_len = args.completion_len or (64 if args.quick else 384)
    if args.child is not None:
        print(json.dumps(child(args.model_dir, CONFIGS[args.child], args)))
        return

    from spiral_lit.prompts import PromptConfig
    from spiral_lit.runtime.models import TinyModelConfig, build_tiny_policy
    from spiral_lit.tasks import ChainSumTask
    from spiral_lit.tools.tiny import tokenizer_corpus

    size = QUICK if args.quick else FULL
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as model_dir:
        corpus = tokenizer_corpus(ChainSumTask(), PromptConfig(), 500)
        build_tiny_policy(model_dir, corpus, TinyModelConfig(**size, max_position_embeddings=2048))
        passthrough = [f"--sequences={args.sequences}", f"--prompt-len={args.prompt_len}",
                       f"--completion-len={args.completion_len}", f"--micro-batch-size={args.micro_batch_size}",
                       f"--threads={args.threads}"]  # fmt: skip
        for name in CONFIGS:
            command = [sys.executable, __file__, "--child", name, "--model-dir", model_dir, *passthrough]
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode != 0:
                results[name] = {"error": run.stderr.strip().splitlines()[-1]}
            else:
                results[name] = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{name}: {results[name]}", file=sys.stderr)
    _print_table(results, size, args)
    out = args.out or (None if args.quick else Path("benchmarks/memory.json"))
    if out is not None:
        setup = {"model": size, "vocab": "tiny tokenizer (320)", **{k: v for k, v in vars(args).items() if k not in
                 ("child", "model_dir", "out")}, "torch": torch.__version__}  # fmt: skip
        out.write_text(json.dumps({"setup": setup, "results": results}, indent=2))


def _print_table(results: dict[str, dict], size: dict, args: argparse.Namespace) -> None:
    first = next((r for r in results.values() if "parameters" in r), {})
    print(f"model {size}, {first.get('parameters', 0) / 1e6:.1f}M parameters; {args.sequences} sequences of "
          f"{args.prompt_len}+{args.completion_len} tokens, micro-batch {args.micro_batch_size}, "
          f"{args.threads} threads")  # fmt: skip
    print("| configuration | trainable | peak RSS MB | step adds MB | params MB | grads MB | optimiser MB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | error: {r['error']} | | | | | |")
            continue
        print(f"| {name} | {r['trainable'] / 1e6:.2f}M | {r['peak_rss_mb']:.0f} | {r['step_peak_mb']:.0f} | "
              f"{r['param_mb']:.0f} | {r['grad_mb']:.0f} | {r['optimizer_state_mb']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
