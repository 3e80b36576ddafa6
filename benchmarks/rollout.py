"""Rollout throughput: our ``KVCacheEngine`` against ``HFGenerateEngine`` (docs/algorithm.md §8.1).

Run: ``python benchmarks/rollout.py --repeats 3 --out benchmarks/rollout.json``
(``--models tiny`` for a quick look; ``--threads 1`` on a machine shared with other jobs,
where two OpenMP threads stall each other). Prints a table and writes the numbers as JSON.

Two request shapes, as training issues them (spiral_lit/scaffolds.py):

- search: 16 chain-sum problems x 8 samples, chat-rendered search prompts (~30 tokens);
- aggregation: 16 sets x 4 samples, each prompt holding 4 candidate solutions (one worked
  solution and three with a slip, ``ChainSumTask.wrong_solutions``), ~300-400 tokens.

Two models of one family: the quickstart's tiny Llama (``TinyModelConfig()``: hidden 192,
4 layers) and a ~50M-parameter Llama (hidden 512, 12 layers, 8 heads, intermediate 2048),
both on the quickstart tokenizer, random weights, fp32, sdpa. On request (``--models``), the tiny
Llama with 2 or 1 key/value heads (``tiny_kv2``, ``tiny_kv1``), and (``--shapes rsa``) 64 aggregation
prompts with one sample each, the shape of recursive aggregation and of evaluation.

Fairness: random weights stop at random points, so EOS is banned for both engines by one
forward hook on ``lm_head`` that sets the EOS logits to -inf (the same hook runs inside both
engines); every trace then runs to ``max_new_tokens`` = 64 and both engines generate exactly
rows x 64 tokens (asserted). Sampling at temperature 1, top-p 1, the same seed per repeat for
both engines. Engines alternate within each repeat (their order flips every repeat), so a
slow phase of a shared machine hits both. Tokens/s = generated tokens / wall time of one
``generate`` call (prefill included); the table shows the median over repeats.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from spiral_lit.fastpath.decode import fused_decode_refusal
from spiral_lit.prompts import PromptConfig, PromptRenderer
from spiral_lit.rollout import HFGenerateEngine, KVCacheEngine, RolloutEngine, SamplingConfig
from spiral_lit.runtime.models import TinyModelConfig, build_tiny_policy
from spiral_lit.tasks import ChainSumTask
from spiral_lit.tools.tiny import tokenizer_corpus

MODEL_SIZES = {
    "tiny": {},
    "50m": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8},
    # The tiny Llama with grouped-query attention (TinyModelConfig.num_kv_heads): a smaller KV cache to read.
    "tiny_kv2": {"num_key_value_heads": 2},
    "tiny_kv1": {"num_key_value_heads": 1},
}
DEFAULT_MODELS = ["tiny", "50m"]
DEFAULT_SHAPES = ["search", "aggregation"]


def build_models(names: list[str]) -> tuple[dict[str, LlamaForCausalLM], PreTrainedTokenizerBase]:
    """The quickstart tiny Llama and its tokenizer; larger sizes reuse its config with other dimensions."""
    task = ChainSumTask()
    with tempfile.TemporaryDirectory() as tmp:
        tiny, tokenizer = build_tiny_policy(tmp, tokenizer_corpus(task, PromptConfig(), 2000), TinyModelConfig())
    models = {}
    for name in names:
        config = copy.deepcopy(tiny.config)
        sizes = MODEL_SIZES[name]
        for key, value in sizes.items():
            setattr(config, key, value)
        config.num_key_value_heads = sizes.get("num_key_value_heads", config.num_attention_heads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config).eval()
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        models[name] = model
    return models, tokenizer


def build_requests(tokenizer: PreTrainedTokenizerBase) -> dict[str, tuple[list[list[int]], int]]:
    """Prompt ids and samples per prompt of the three shapes (``rsa``: 64 distinct aggregation prompts, one sample
    each, as in recursive aggregation, where no two rows share a prompt)."""
    task = ChainSumTask()
    renderer = PromptRenderer(tokenizer, PromptConfig(), task.answer_instruction)
    problems = [task.problem(i, "heldout") for i in range(16)]
    search = [renderer.search(p) for p in problems]
    aggregation = []
    for i, problem in enumerate(problems):
        rng = random.Random(i)
        candidates = [problem.solution or "", *task.wrong_solutions(problem, 3, rng)]
        aggregation.append(renderer.aggregation_from_texts(problem, candidates, rng))
    rsa = []
    for i in range(64):
        problem, rng = problems[i % 16], random.Random(100 + i)
        candidates = [problem.solution or "", *task.wrong_solutions(problem, 3, rng)]
        rsa.append(renderer.aggregation_from_texts(problem, candidates, rng))
    return {"search": (search, 8), "aggregation": (aggregation, 4), "rsa": (rsa, 1)}


def ban_eos(model: LlamaForCausalLM, eos_id: int) -> None:
    """EOS logits -> -inf in every forward of both engines, so all traces run to the token budget."""

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], logits: torch.Tensor) -> None:
        logits[..., eos_id] = float("-inf")

    model.lm_head.register_forward_hook(hook)


def time_once(engine: RolloutEngine, prompts: list[list[int]], n: int, sampling: SamplingConfig, seed: int) -> float:
    """Generated tokens per second of one ``generate`` call."""
    start = time.perf_counter()
    out = engine.generate(prompts, n, sampling, seed)
    seconds = time.perf_counter() - start
    tokens = sum(c.num_tokens for group in out for c in group)
    assert tokens == len(prompts) * n * sampling.max_new_tokens, "engines must generate the same number of tokens"
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per engine, model and shape")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/rollout.json"), help="JSON results path")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODEL_SIZES))
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=["search", "aggregation", "rsa"])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--vllm", action="store_true", help="also time the vllm backend (needs vllm)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    models, tokenizer = build_models(args.models)
    requests = {shape: request for shape, request in build_requests(tokenizer).items() if shape in args.shapes}
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=1.0)
    for shape, (prompts, n) in requests.items():
        lengths = [len(p) for p in prompts]
        print(f"{shape}: {len(prompts)} prompts x {n} samples, prompt tokens {min(lengths)}-{max(lengths)}")
    results, ratios = [], {}
    for name, model in models.items():
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model {name}: {n_params / 1e6:.2f}M parameters")
        ban_eos(model, tokenizer.eos_token_id)
        refusal = fused_decode_refusal(model)
        print(f"  kv_cache decode step: {'fused (fastpath/decode.py)' if refusal is None else refusal}")
        engines: dict[str, RolloutEngine] = {
            "hf": HFGenerateEngine(model, tokenizer),
            "kv_cache": KVCacheEngine(model, tokenizer),
        }
        if args.vllm:
            from _vllm_backend import make_vllm_engine  # benchmarks/ is on sys.path when run as a script

            vllm_engine = make_vllm_engine(model, tokenizer)  # None, reason printed: no vllm or head size
            if vllm_engine is not None:
                engines["vllm"] = vllm_engine
        for shape, (prompts, n) in requests.items():
            for engine in engines.values():  # warm-up: allocator, kernels, lazy init
                engine.generate(prompts[:2], n, SamplingConfig(max_new_tokens=4), seed=0)
            speeds: dict[str, list[float]] = {key: [] for key in engines}
            for repeat in range(args.repeats):
                order = list(engines) if repeat % 2 == 0 else list(reversed(engines))
                for key in order:
                    speeds[key].append(time_once(engines[key], prompts, n, sampling, seed=repeat))
            medians = {key: statistics.median(values) for key, values in speeds.items()}
            ratios[f"{name}/{shape}"] = medians["kv_cache"] / medians["hf"]
            if "vllm" in medians:
                ratios[f"{name}/{shape}/vllm"] = medians["vllm"] / medians["hf"]
            for key, values in speeds.items():
                results.append(
                    {"model": name, "params": n_params, "shape": shape, "engine": key, "tokens_per_s": values}
                )
                print(f"  {shape:<12} {key:<9} {medians[key]:9.0f} tok/s  (runs: {[round(v) for v in values]})")

    print("\n| model | shape | hf tok/s | kv_cache tok/s | kv_cache / hf | vllm tok/s | vllm / hf |")
    print("|---|---|---|---|---|---|---|")
    for key, ratio in ratios.items():
        if key.endswith("/vllm"):
            continue
        name, shape = key.split("/")
        med = {
            r["engine"]: statistics.median(r["tokens_per_s"])
            for r in results
            if r["model"] == name and r["shape"] == shape
        }
        vllm_cols = f"{med['vllm']:.0f} | {med['vllm'] / med['hf']:.2f}x" if "vllm" in med else "- | -"
        print(f"| {name} | {shape} | {med['hf']:.0f} | {med['kv_cache']:.0f} | {ratio:.2f}x | {vllm_cols} |")
    settings = {
        "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens,
        "temperature": 1.0,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "ratios": ratios, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
