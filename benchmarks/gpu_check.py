"""GPU check: greedy parity of the rollout backends, a short bf16 FSDP1 SPIRAL fit, the rollout benchmark.

Run: ``bash benchmarks/gpu_check.sh`` on a machine with one GPU (under 8 minutes); ``--device cpu`` runs the same
stages with small settings (no FSDP, fp32) so the script itself can be checked on any machine.
Prints one table and writes JSON (``--out``, default runs/gpu_check/summary.json).

Stages (``--stages``, any subset):

- parity: the same fp32 model generates greedily with ``kv_cache``, ``hf`` and ``vllm`` on prompts of different
  lengths (left padding, an aggregation prompt spanning several KV blocks); token ids must be identical pairwise.
  The model is the tiny Llama at head size 64 (which every vLLM attention backend accepts) with its weights noised,
  as the engine tests do, so that greedy traces vary and near-ties are rare; or ``--model DIR`` as it is.
- fit: ``python -m spiral_lit fit --config experiments/gpu_check/spiral_fsdp_bf16.yaml`` (5 SPIRAL steps, FSDP1,
  ``bf16-mixed``, one device), read back from TensorBoard.
- rollout: benchmarks/rollout.py's models, prompts and timing, with the models on ``--device``.

Every stage runs in its own subprocess with a time limit, so a crash or a hang costs only that stage; the limits
fit inside ``--budget-s``. vLLM runs where it imports: this interpreter, else ``.venv-vllm/bin/python`` (the venv
CI builds); otherwise its checks are skipped. Exit status 1 when a check failed (a skipped check is no failure).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
FIT_CONFIG = ROOT / "experiments" / "gpu_check" / "spiral_fsdp_bf16.yaml"
STAGES = ("parity", "fit", "rollout")
BACKENDS = ("kv_cache", "hf", "vllm")
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_layers": 2, "num_heads": 2}
"""The parity and fit model: head size 64, which vLLM's GPU and CPU attention both support."""
LIMITS_S = {"device": 60, "build": 60, "parity": 90, "parity_vllm": 120, "fit": 180, "rollout": 180}
"""Most seconds each subprocess may take; ``--budget-s`` caps their sum as they run."""
FIT_STEPS = 5
Status = Literal["pass", "fail", "skipped"]


@dataclass
class StageResult:
    """One check's outcome: what the table prints and the JSON keeps."""

    status: Status
    seconds: float
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Settings:
    """Sizes of the checks; the CPU defaults keep a run of the whole script to about a minute."""

    device: str
    parity_tokens: int
    rollout_models: list[str]
    rollout_tokens: int
    rollout_repeats: int


def default_settings(device: str) -> Settings:
    """GPU: the benchmark's full shapes; CPU: tiny ones."""
    if device == "cpu":
        return Settings(device, parity_tokens=16, rollout_models=["tiny"], rollout_tokens=16, rollout_repeats=1)
    return Settings(device, parity_tokens=32, rollout_models=["tiny", "50m"], rollout_tokens=64, rollout_repeats=2)


# ----------------------------------------------------------------------------- subprocesses
class Clock:
    """The run's time budget: each subprocess gets its own limit or what is left, whichever is less."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s

    def limit(self, stage: str) -> float:
        return max(0.0, min(LIMITS_S[stage], self.deadline - time.monotonic()))


@dataclass
class Run:
    """A finished subprocess."""

    returncode: int | None
    """None when it was killed at its time limit."""
    seconds: float
    log: Path

    def failure(self) -> str:
        """Why it failed, for the table: the time limit or the log's last error line."""
        if self.returncode is None:
            return f"killed at its time limit ({self.seconds:.0f} s); log {self.log}"
        return f"exit {self.returncode}: {last_error(self.log)} (log {self.log})"


def run_logged(cmd: list[str], log: Path, timeout_s: float, env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` in its own process group (so a timeout kills its children too), output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env or os.environ.copy(), start_new_session=True
        )
        try:
            returncode: int | None = proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            kill_group(proc)
            returncode = None
        except BaseException:  # Ctrl-C: the group is in its own session and would not get the signal
            kill_group(proc)
            raise
    return Run(returncode, time.monotonic() - start, log)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill the process group ``proc`` leads (it and whatever it started) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def last_error(log: Path) -> str:
    """The last line of ``log`` that names an error, else its last line, shortened."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line.lower()]
    line = (errors or lines or ["(no output)"])[-1]
    return line if len(line) <= 200 else line[:197] + "..."


def worker_cmd(python: str, mode: str, result: Path, *args: str) -> list[str]:
    """This script in worker mode under ``python``."""
    return [python, str(Path(__file__).resolve()), "_worker", mode, "--result", str(result), *args]


def worker_env() -> dict[str, str]:
    """vLLM on CPU pins OpenMP threads to cores unless told not to; on a shared machine it must not."""
    return {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "TOKENIZERS_PARALLELISM": "false"}


@functools.cache
def vllm_python(device: str) -> tuple[str | None, str]:
    """An interpreter that imports vLLM (and sees CUDA when ``device`` is cuda), or None and why not."""
    candidates = [sys.executable] if importlib.util.find_spec("vllm") else []
    venv = ROOT / ".venv-vllm" / "bin" / "python"
    if venv.exists():
        candidates.append(str(venv))
    if not candidates:
        return None, "vllm not installed (pip install vllm) and no .venv-vllm"
    probe = "import torch, vllm; assert torch.cuda.is_available(), 'no CUDA in this interpreter'"
    for python in candidates:
        code = probe if device == "cuda" else "import vllm"
        try:
            done = subprocess.run([python, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            continue
        if done.returncode == 0:
            return python, ""
    return None, f"no interpreter imports vllm with {device} ({', '.join(candidates)})"


# ----------------------------------------------------------------------------- driver stages
def check_device(settings: Settings, work: Path, clock: Clock) -> StageResult:
    """The device exists, and which one it is (the table's header)."""
    code = (
        "import json, torch, transformers; cuda = torch.cuda.is_available(); "
        "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__, 'cuda': cuda, "
        "'name': torch.cuda.get_device_name(0) if cuda else 'cpu'}))"
    )
    run = run_logged([sys.executable, "-c", code], work / "logs" / "device.log", clock.limit("device"))
    if run.returncode != 0:
        return StageResult("fail", run.seconds, run.failure())
    info = json.loads(run.log.read_text().splitlines()[-1])
    if settings.device == "cuda" and not info["cuda"]:
        return StageResult("fail", run.seconds, "torch sees no CUDA device", info)
    return StageResult("pass", run.seconds, f"{info['name']}, torch {info['torch']}", info)


def build_tiny(work: Path, clock: Clock) -> tuple[StageResult, Path]:
    """The tiny Llama as users build it (``python -m spiral_lit tiny``), at head size 64."""
    out = work / "tiny"
    sizes = [arg for key, value in TINY.items() for arg in (f"--tiny.{key}", str(value))]
    cmd = [sys.executable, "-m", "spiral_lit", "tiny", "--out", str(out), *sizes, "--n_corpus_problems", "500"]
    run = run_logged(cmd, work / "logs" / "build.log", clock.limit("build"))
    if run.returncode != 0:
        return StageResult("fail", run.seconds, run.failure()), out
    head = TINY["hidden_size"] // TINY["num_heads"]
    detail = f"hidden {TINY['hidden_size']}, {TINY['num_layers']} layers, head size {head}"
    return StageResult("pass", run.seconds, detail, {"path": str(out), **TINY}), out


def generate_ids(
    python: str, backends: list[str], model: Path, settings: Settings, work: Path, clock: Clock, *extra: str
) -> tuple[dict[str, Any], Run]:
    """Greedy token ids of ``backends`` from a worker; an empty result when the worker died."""
    name = "parity_vllm" if "vllm" in backends else "parity"
    result = work / f"{name}.json"
    result.unlink(missing_ok=True)
    args = ["--device", settings.device, "--model", str(model), "--tokens", str(settings.parity_tokens)]
    cmd = worker_cmd(python, "generate", result, *args, "--backends", *backends, *extra)
    run = run_logged(cmd, work / "logs" / f"{name}.log", clock.limit(name), worker_env())
    return (json.loads(result.read_text()) if result.exists() else {}), run


def first_mismatch(a: list[list[list[int]]], b: list[list[list[int]]]) -> dict[str, int] | None:
    """Where two backends' greedy ids first differ (prompt, sample, token position), or None if identical."""
    for p, (group_a, group_b) in enumerate(zip(a, b, strict=False)):
        for s, (ids_a, ids_b) in enumerate(zip(group_a, group_b, strict=False)):
            if ids_a != ids_b:
                return {"prompt": p, "sample": s, "position": common_prefix(ids_a, ids_b)}
        if len(group_a) != len(group_b):
            return {"prompt": p, "sample": min(len(group_a), len(group_b)), "position": 0}
    if len(a) != len(b):
        return {"prompt": min(len(a), len(b)), "sample": 0, "position": 0}
    return None


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix: the first position where the two traces differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def compare_backends(ids: dict[str, Any], missing: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Every pair of backends: identical ids, where they first differ, or why the pair was not compared."""
    pairs: dict[str, dict[str, Any]] = {}
    for a, b in (("kv_cache", "hf"), ("vllm", "hf"), ("vllm", "kv_cache")):
        key = f"{a}={b}"
        if a in ids and b in ids:
            mismatch = first_mismatch(ids[a], ids[b])
            pairs[key] = {"status": "pass" if mismatch is None else "fail", "first_mismatch": mismatch}
        else:
            why = "; ".join(f"{x} {missing[x]}" for x in (a, b) if x in missing)
            skipped = all(missing.get(x, "").startswith("skipped") for x in (a, b) if x in missing)
            pairs[key] = {"status": "skipped" if skipped else "fail", "reason": why}
    return pairs


def parity(settings: Settings, model: Path, noise: bool, work: Path, clock: Clock) -> StageResult:
    """Greedy ids of kv_cache and hf (this interpreter), then vllm (wherever it imports), compared pairwise."""
    start = time.monotonic()
    noised = work / "parity_model"
    extra = ["--noise-to", str(noised)] if noise else []
    out, run = generate_ids(sys.executable, ["kv_cache", "hf"], model, settings, work, clock, *extra)
    if not out:
        return StageResult("fail", time.monotonic() - start, f"kv_cache/hf worker: {run.failure()}")
    ids, missing = dict(out["ids"]), dict(out["errors"])
    missing.update(vllm_ids(settings, noised if noise else model, work, clock, ids))
    pairs = compare_backends(ids, missing)
    statuses = {pair["status"] for pair in pairs.values()}
    status: Status = "fail" if "fail" in statuses else "pass" if "pass" in statuses else "skipped"
    data = {"pairs": pairs, "errors": missing, "seconds": out.get("seconds", {}), "shape": out.get("shape")}
    return StageResult(status, time.monotonic() - start, parity_detail(pairs, out.get("shape")), data)


def vllm_ids(settings: Settings, model: Path, work: Path, clock: Clock, ids: dict[str, Any]) -> dict[str, str]:
    """Adds vLLM's greedy ids to ``ids``; returns {"vllm": why} when there are none."""
    if not model.exists():
        return {"vllm": f"not run: no model at {model}"}
    python, reason = vllm_python(settings.device)
    if python is None:
        return {"vllm": f"skipped: {reason}"}
    out, run = generate_ids(python, ["vllm"], model, settings, work, clock)
    if "vllm" in out.get("ids", {}):
        ids["vllm"] = out["ids"]["vllm"]
        return {}
    return {"vllm": out.get("errors", {}).get("vllm", run.failure())}


def parity_detail(pairs: dict[str, dict[str, Any]], shape: dict[str, int] | None) -> str:
    """One line: the shape and how many pairs were identical (each pair gets its own row in the table)."""
    head = f"{shape['prompts']} prompts x {shape['n']}, {shape['tokens']} greedy tokens, fp32" if shape else "no ids"
    identical = sum(pair["status"] == "pass" for pair in pairs.values())
    return f"{head}; {identical} of {len(pairs)} backend pairs identical"


def pair_text(pair: dict[str, Any]) -> str:
    """A pair's verdict: identical, where it differs, or why it was not compared."""
    if pair["status"] == "pass":
        return "identical token ids"
    if pair.get("first_mismatch"):
        m = pair["first_mismatch"]
        return f"DIFFER: prompt {m['prompt']}, sample {m['sample']}, first at token {m['position']}"
    return pair["reason"]


def fit(settings: Settings, tiny: Path, work: Path, clock: Clock) -> StageResult:
    """The SPIRAL fit through the CLI; on CPU without FSDP and in fp32 (Lightning refuses FSDPStrategy on CPU)."""
    logs = work / "fit_logs"
    shutil.rmtree(logs, ignore_errors=True)
    cmd = [sys.executable, "-m", "spiral_lit", "fit", "--config", str(FIT_CONFIG)]
    cmd += ["--model.init_args.policy.path", str(tiny), "--trainer.logger.init_args.save_dir", str(logs)]
    note = "FSDP1, bf16-mixed"
    if settings.device == "cpu":
        cmd += ["--trainer.accelerator", "cpu", "--trainer.strategy", "auto", "--trainer.precision", "32-true"]
        note = "CPU: strategy auto, 32-true (Lightning's FSDPStrategy needs CUDA)"
    run = run_logged(cmd, work / "logs" / "fit.log", clock.limit("fit"), worker_env())
    if run.returncode != 0:
        return StageResult("fail", run.seconds, f"{note}; {run.failure()}", {"config": note})
    return judge_fit(run, logs, note)


def judge_fit(run: Run, logs: Path, note: str) -> StageResult:
    """Pass when every step logged a finite loss, a non-zero gradient and no skipped step, and validation ran."""
    try:
        scalars = tensorboard_scalars(logs)
    except Exception as error:  # noqa: BLE001 - any reader failure is reported, not raised
        return StageResult("fail", run.seconds, f"{note}; exit 0 but TensorBoard unreadable: {error}")
    loss = scalars.get("train/loss", [])
    grad = scalars.get("train/grad_norm/total", [])
    speeds = scalars.get("time/generate_tokens_per_s", [])
    data = {
        "config": note,
        "steps_logged": len(loss),
        "final_loss": loss[-1] if loss else None,
        "final_grad_norm": grad[-1] if grad else None,
        "nonfinite_steps": sum(scalars.get("train/nonfinite_steps", [])),
        "generate_tokens_per_s": statistics.median(speeds) if speeds else None,
        "val_metrics": sum(tag.startswith("val/") for tag in scalars),
    }
    problems = fit_problems(data, loss, grad)
    detail = (
        f"{note}; {data['steps_logged']} steps, train/loss {fmt(data['final_loss'], '.4f')}, grad norm "
        f"{fmt(data['final_grad_norm'], '.3g')}, generate {fmt(data['generate_tokens_per_s'], '.0f')} tok/s, "
        f"{data['val_metrics']} val metrics"
    )
    if problems:
        return StageResult("fail", run.seconds, f"{detail}; " + ", ".join(problems), data)
    return StageResult("pass", run.seconds, detail, data)


def fit_problems(data: dict[str, Any], loss: list[float], grad: list[float]) -> list[str]:
    """What is wrong with a fit that exited 0."""
    problems = []
    if len(loss) != FIT_STEPS:
        problems.append(f"expected {FIT_STEPS} logged steps")
    if not all(math.isfinite(v) for v in loss):
        problems.append("non-finite loss")
    if not grad or not all(math.isfinite(v) and v > 0 for v in grad):
        problems.append("zero or non-finite gradient norm")
    if data["nonfinite_steps"]:
        problems.append("skipped non-finite steps")
    if not data["val_metrics"]:
        problems.append("no validation metrics")
    return problems


def tensorboard_scalars(log_dir: Path) -> dict[str, list[float]]:
    """Every scalar logged below ``log_dir``, by tag, in event-file order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for path in sorted(log_dir.rglob("events.out.tfevents*")):
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return out


def rollout(settings: Settings, work: Path, clock: Clock) -> StageResult:
    """benchmarks/rollout.py's measurement on ``--device``; in the vLLM interpreter when there is one."""
    python, reason = vllm_python(settings.device)
    result = work / "rollout.json"
    result.unlink(missing_ok=True)
    args = ["--device", settings.device, "--tokens", str(settings.rollout_tokens)]
    args += ["--repeats", str(settings.rollout_repeats), "--models", *settings.rollout_models]
    if python is not None:
        args.append("--vllm")
    cmd = worker_cmd(python or sys.executable, "rollout", result, *args)
    run = run_logged(cmd, work / "logs" / "rollout.log", clock.limit("rollout"), worker_env())
    if not result.exists():
        return StageResult("fail", run.seconds, run.failure())
    out = json.loads(result.read_text())
    if python is None:
        out["errors"]["vllm"] = f"skipped: {reason}"
    failed = [key for key, why in out["errors"].items() if not why.startswith("skipped")]
    status: Status = "fail" if failed or run.returncode != 0 else "pass"
    notes = [f"{key}: {why}" for key, why in out["errors"].items()]
    if run.returncode != 0:
        notes.append(f"worker {run.failure()}")
    return StageResult(status, run.seconds, "; ".join(notes) or "every backend ran", out)


# ----------------------------------------------------------------------------- workers
def worker_generate(args: argparse.Namespace) -> dict[str, Any]:
    """Greedy ids of each backend in ``args.backends`` on the parity prompts."""
    import torch

    from spiral_lit.rollout import SamplingConfig

    torch.backends.cuda.matmul.allow_tf32 = False  # the default; fp32 parity must not depend on it
    torch.backends.cudnn.allow_tf32 = False
    model, tokenizer = load_model(args)
    prompts = parity_prompts(tokenizer)
    greedy = SamplingConfig(max_new_tokens=args.tokens, temperature=0.0)
    out: dict[str, Any] = {"ids": {}, "errors": {}, "seconds": {}}
    out["shape"] = {"prompts": len(prompts), "n": 2, "tokens": args.tokens}
    for backend in args.backends:
        start = time.perf_counter()
        try:
            engine = make_parity_engine(backend, model, tokenizer)
            groups = engine.generate(prompts, 2, greedy, seed=0)
            out["ids"][backend] = [[c.token_ids for c in group] for group in groups]
        except Exception as error:  # noqa: BLE001 - one backend's failure is its result
            out["errors"][backend] = f"{type(error).__name__}: {error}"[:300]
        out["seconds"][backend] = time.perf_counter() - start
    return out


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The parity model on the device, fp32; noised and saved first when ``--noise-to`` is given."""
    import torch

    from spiral_lit.runtime.models import PolicyConfig, load_policy

    model, tokenizer = load_policy(PolicyConfig(path=str(args.model)))
    if args.noise_to is not None:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # std 0.2, as the engine tests: varied greedy traces, rare near-ties
            for param in model.parameters():
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(args.noise_to)
        tokenizer.save_pretrained(args.noise_to)
    return model.to(args.device).eval(), tokenizer


def parity_prompts(tokenizer: Any) -> list[list[int]]:
    """Three search prompts of different lengths (left padding) and an aggregation prompt of ~300 tokens."""
    import random

    from spiral_lit.prompts import PromptConfig, PromptRenderer
    from spiral_lit.tasks import ChainSumTask

    task = ChainSumTask()
    renderer = PromptRenderer(tokenizer, PromptConfig(), task.answer_instruction)
    problem = task.problem(0, "train")
    candidates = [problem.solution or "", *task.wrong_solutions(problem, 3, random.Random(0))]
    return [
        renderer.search(ChainSumTask(n_terms=5).problem(0, "train")),
        renderer.search(ChainSumTask(n_terms=2, digits=1).problem(0, "train")),
        renderer.search(ChainSumTask(n_terms=3, digits=2).problem(1, "train")),
        renderer.aggregation_from_texts(problem, candidates, random.Random(0)),
    ]


def make_parity_engine(backend: str, model: Any, tokenizer: Any) -> Any:
    """The backend's engine; vLLM in fp32, eager (fast start-up), with a small KV cache."""
    from spiral_lit.rollout import VLLMConfig, make_engine

    config = VLLMConfig(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=256 << 20, max_model_len=1024)
    return make_engine(backend, model, tokenizer, 64, config if backend == "vllm" else None)


def worker_rollout(args: argparse.Namespace) -> dict[str, Any]:
    """rollout.py's models, prompts, EOS ban, warm-up and timing, with the models on ``args.device``."""
    import rollout as bench  # benchmarks/ is sys.path[0] when this file runs as a script
    import torch

    from spiral_lit.rollout import SamplingConfig

    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 as the benchmark's CPU numbers
    models, tokenizer = bench.build_models(args.models)
    requests = bench.build_requests(tokenizer)
    sampling = SamplingConfig(max_new_tokens=args.tokens, temperature=1.0)
    settings = {"device": args.device, "models": args.models, "tokens": args.tokens, "repeats": args.repeats}
    out: dict[str, Any] = {"results": [], "errors": {}, "settings": settings | {"torch": torch.__version__}}
    for name, model in models.items():
        model.to(args.device)
        bench.ban_eos(model, tokenizer.eos_token_id)
        errors: dict[str, str] = {}
        engines = rollout_engines(model, tokenizer, args.vllm, errors)
        for shape, (prompts, n) in requests.items():
            speeds = time_engines(bench, engines, prompts, n, sampling, args.repeats, errors)
            out["results"] += [
                {"model": name, "shape": shape, "engine": k, "tokens_per_s": v} for k, v in speeds.items()
            ]
            out["errors"] |= {f"{name}/{key}": why for key, why in errors.items()}
            args.result.write_text(json.dumps(out))  # what is done so far survives a time-out
    return out


def rollout_engines(model: Any, tokenizer: Any, vllm: bool, errors: dict[str, str]) -> dict[str, Any]:
    """hf and kv_cache, and vLLM when asked and it can run ``model`` (rollout.py's EOS-banned engine, eager)."""
    from spiral_lit.rollout import HFGenerateEngine, KVCacheEngine, VLLMConfig

    engines: dict[str, Any] = {"hf": HFGenerateEngine(model, tokenizer), "kv_cache": KVCacheEngine(model, tokenizer)}
    if not vllm:
        return engines
    from _vllm_backend import EOSBannedVLLMEngine, unsupported_reason

    reason = unsupported_reason(model)
    if reason is not None:
        errors["vllm"] = f"skipped: {reason}"
        return engines
    config = VLLMConfig(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=1 << 30, max_model_len=1024)
    try:
        engines["vllm"] = EOSBannedVLLMEngine(model, tokenizer, max_batch_size=256, config=config)
    except Exception as error:  # noqa: BLE001 - reported in the table, the other engines still run
        errors["vllm"] = f"start-up: {type(error).__name__}: {error}"[:300]
    return engines


def time_engines(
    bench: Any, engines: dict[str, Any], prompts: list[list[int]], n: int, sampling: Any, repeats: int,
    errors: dict[str, str],
) -> dict[str, list[float]]:  # fmt: skip
    """Tokens/s of each engine per repeat, after a warm-up, order flipped every repeat (as rollout.py); an engine
    that raises is reported in ``errors`` and left out from then on."""
    from spiral_lit.rollout import SamplingConfig

    warm_up = SamplingConfig(max_new_tokens=4)
    speeds: dict[str, list[float]] = {}
    for key, engine in engines.items():
        if guarded(key, errors, engine.generate, prompts[:2], n, warm_up, 0) is not None:
            speeds[key] = []
    for repeat in range(repeats):
        for key in list(speeds) if repeat % 2 == 0 else list(reversed(speeds)):
            timed = guarded(key, errors, bench.time_once, engines[key], prompts, n, sampling, repeat)
            if timed is None:
                del speeds[key]
            else:
                speeds[key].append(timed)
    return speeds


def guarded(key: str, errors: dict[str, str], call: Any, *args: Any) -> Any:
    """``call(*args)``, or None with the exception recorded under ``key`` (one engine's failure is its result)."""
    try:
        return call(*args)
    except Exception as error:  # noqa: BLE001
        errors[key] = f"{type(error).__name__}: {error}"[:300]
        return None


def worker_main(argv: list[str]) -> None:
    """``_worker MODE --result FILE ...``: run one measurement and write its JSON."""
    parser = argparse.ArgumentParser(prog="gpu_check.py _worker")
    parser.add_argument("mode", choices=["generate", "rollout"])
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--noise-to", type=Path)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--models", nargs="+", default=["tiny"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--vllm", action="store_true")
    args = parser.parse_args(argv)
    out = worker_generate(args) if args.mode == "generate" else worker_rollout(args)
    args.result.write_text(json.dumps(out))


# ----------------------------------------------------------------------------- report
def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_rows(results: dict[str, StageResult]) -> list[tuple[str, str, str, str]]:
    """(check, status, seconds, result) per stage; the rollout stage adds one row per model and shape."""
    rows = []
    for name, result in results.items():
        rows.append((name, result.status, f"{result.seconds:.1f}", result.detail))
        if name == "parity":
            pairs = result.data.get("pairs", {}).items()
            rows.extend((f"parity {key}", pair["status"], "", pair_text(pair)) for key, pair in pairs)
        if name == "rollout":
            rows.extend(rollout_rows(result.data.get("results", [])))
    return rows


def rollout_rows(results: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """One row per model and shape: median tokens/s of each backend and kv_cache's ratio to hf."""
    medians: dict[tuple[str, str], dict[str, float]] = {}
    for r in results:
        if r["tokens_per_s"]:
            medians.setdefault((r["model"], r["shape"]), {})[r["engine"]] = statistics.median(r["tokens_per_s"])
    rows = []
    for (model, shape), speeds in medians.items():
        text = ", ".join(f"{engine} {speed:.0f}" for engine, speed in speeds.items()) + " tok/s"
        if "hf" in speeds and "kv_cache" in speeds:
            text += f"; kv_cache/hf {speeds['kv_cache'] / speeds['hf']:.2f}x"
        rows.append((f"rollout {model}/{shape}", "", "", text))
    return rows


def print_table(results: dict[str, StageResult], header: str) -> None:
    print(f"\n{header}\n")
    print("| check | status | seconds | result |")
    print("|---|---|---|---|")
    for row in table_rows(results):
        print("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")


# ----------------------------------------------------------------------------- main
def run_stages(args: argparse.Namespace, settings: Settings, clock: Clock) -> dict[str, StageResult]:
    """The device check, the model build when a stage needs it, then the chosen stages in order."""
    work: Path = args.work
    results = {"device": check_device(settings, work, clock)}
    if results["device"].status != "pass":
        for stage in args.stages:
            results[stage] = StageResult("fail", 0.0, "not run: the device check failed")
        return results
    tiny = work / "tiny"
    if "fit" in args.stages or ("parity" in args.stages and args.model is None):
        results["build"], tiny = build_tiny(work, clock)
    built = "build" not in results or results["build"].status == "pass"
    for stage in args.stages:
        if clock.limit(stage) < 5:
            results[stage] = StageResult("fail", 0.0, f"not run: the {args.budget_s:.0f} s budget was spent")
        elif stage == "parity":
            model = args.model or tiny
            ok = args.model is not None or built
            results[stage] = parity(settings, model, args.model is None, work, clock) if ok else not_built()
        elif stage == "fit":
            results[stage] = fit(settings, tiny, work, clock) if built else not_built()
        else:
            results[stage] = rollout(settings, work, clock)
        print(f"[gpu_check] {stage}: {results[stage].status} ({results[stage].seconds:.1f} s)", flush=True)
    return results


def not_built() -> StageResult:
    return StageResult("fail", 0.0, "not run: the tiny model could not be built")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check/summary.json"), help="JSON summary")
    parser.add_argument("--work", type=Path, default=Path("runs/gpu_check"), help="models, logs, run outputs")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--model", type=Path, help="parity model directory (default: the tiny Llama, noised)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="all subprocesses together")
    parser.add_argument("--parity-tokens", type=int, help="greedy tokens per trace (default: by device)")
    parser.add_argument("--rollout-models", nargs="+", choices=["tiny", "50m"], help="default: by device")
    parser.add_argument("--rollout-tokens", type=int, help="tokens per trace (default: by device)")
    parser.add_argument("--rollout-repeats", type=int, help="timed calls per engine (default: by device)")
    args = parser.parse_args(argv)
    args.work, args.out = args.work.resolve(), args.out.resolve()
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    """The device's defaults with the flags given on top."""
    settings = default_settings(args.device)
    for key in ("parity_tokens", "rollout_models", "rollout_tokens", "rollout_repeats"):
        if getattr(args, key) is not None:
            setattr(settings, key, getattr(args, key))
    return settings


def main(argv: list[str]) -> int:
    if argv[:1] == ["_worker"]:
        worker_main(argv[1:])
        return 0
    args = parse_args(argv)
    settings = settings_from(args)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    results = run_stages(args, settings, Clock(args.budget_s))
    total = time.monotonic() - start
    device = results["device"].detail if results["device"].status == "pass" else args.device
    print_table(results, f"GPU check on {device} ({args.device}), {total:.0f} s in all")
    summary = {
        "device": args.device,
        "settings": asdict(settings),
        "total_seconds": total,
        "stages": {name: asdict(result) for name, result in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 1 if any(r.status == "fail" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
