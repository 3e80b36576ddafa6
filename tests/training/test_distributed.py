"""2 CPU processes over gloo train the policy exactly as 1 process would (docs/algorithm.md §4.5).

Each test runs this file as a script (``python tests/training/test_distributed.py --strategy ...``) in a
subprocess; Lightning's launcher starts the second rank by re-running it. Every rank rolls out
its own prompts with its own seeds, so the reference is computed here, in one process: the
sequences each rank handed to ``PolicyUpdater`` are recorded, and one ``PolicyUpdater`` with
``world_size=1`` takes the union of both ranks' sequences step by step from the same starting
weights and optimiser. Equal final parameters mean that the loss normaliser is summed over ranks,
that gradient averaging is undone exactly (DDP and FSDP2 both average), and that the zero-weight
passes of the less busy rank add nothing: rank 1 keeps only a third of its sequences, so it runs
fewer micro-batches than rank 0 and must pad with zero-weight passes.

The optimiser is plain SGD with clipping far above the gradient norm: Adam's first step and a
clipped gradient would both hide a gradient off by a constant factor (e.g. the world size).
Tolerance: 1e-5 absolute on parameters whose update is ~1e-2 (the sums run in another order).

The worker also checks generation under FSDP2: with the parameters gathered
(``PolicyRuntime.gathered``) the two ranks generate from different numbers of prompts, so a
collective left inside a forward would hang, and the tokens must equal those of an unsharded copy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from spiral_lit.training.batching import pack

ROOT = Path(__file__).resolve().parents[2]
LR = 0.5
STEPS = 2
UPDATE = {"micro_batch_size": 4, "max_grad_norm": 1.0e6}
ALGORITHM = {"n_search": 4, "n_sets": 2, "set_size": 2, "n_agg": 2}
MAX_NEW_TOKENS = 8


# ----------------------------------------------------------------------------- the worker (one rank)
def _worker(args: argparse.Namespace) -> None:
    import lightning as L
    from hash_task import VoteTask
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    from spiral_lit.rollout import SamplingConfig, make_engine
    from spiral_lit.runtime.models import PolicyConfig, load_policy
    from spiral_lit.runtime.policy import VerifierConfig
    from spiral_lit.training.data import ProblemDataModule
    from spiral_lit.training.spiral_module import AlgorithmConfig, SpiralModule
    from spiral_lit.training.update import UpdateConfig
    from spiral_lit.training.warm_start import WarmStartModule

    torch.set_num_threads(1)
    out = Path(args.out)
    sampling = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS)

    class Recording(SpiralModule):
        """Records what each rank trains on; rank 1 keeps a third of it (fewer micro-batches than rank 0)."""

        def on_train_start(self) -> None:
            prompts = [self.runtime.renderer.search(self.task.problem(i, "train")) for i in range(2 + self.global_rank)]
            with self.runtime.gathered():
                got = self.runtime.engine.generate(prompts, 2, sampling, seed=7)
            model, tokenizer = load_policy(self.policy_config)
            want = make_engine(self.hparams.rollout_backend, model, tokenizer).generate(prompts, 2, sampling, seed=7)
            same = [
                a.token_ids == b.token_ids for x, y in zip(got, want, strict=True) for a, b in zip(x, y, strict=True)
            ]
            (out / f"rollout_rank{self.global_rank}.json").write_text(json.dumps(same))

        def _update(self, sequences):  # noqa: ANN001, ANN202 - the parent's signature
            if self.global_rank == 1:
                sequences = sequences[: len(sequences) // 3]
            torch.save(sequences, out / f"sequences_rank{self.global_rank}_step{self.global_step}.pt")
            return super()._update(sequences)

    class RecordingWarmStart(WarmStartModule):
        """Records each rank's warm-start examples; rank 1 keeps one (fewer micro-batches than rank 0)."""

        def examples(self, batch):  # noqa: ANN001, ANN202 - the parent's signature
            prompts, targets, roles = super().examples(batch)
            if self.global_rank == 1:
                prompts, targets, roles = prompts[:1], targets[:1], roles[:1]
            torch.save((prompts, targets), out / f"examples_rank{self.global_rank}_step{self.global_step}.pt")
            return prompts, targets, roles

    task = VoteTask(n_terms=2, digits=2)
    backend = "hf" if args.strategy == "fsdp2" else "kv_cache"
    optimizer = lambda params: torch.optim.SGD(params, lr=LR)  # noqa: E731
    if args.module == "sft":
        module = RecordingWarmStart(
            policy=PolicyConfig(args.policy), task=task, micro_batch_size=3, micro_batch_tokens=None,
            max_grad_norm=UPDATE["max_grad_norm"], verifier=VerifierConfig(num_workers=0), rollout_backend=backend,
            optimizer=optimizer,
        )  # fmt: skip
    else:
        module = Recording(
            policy=PolicyConfig(args.policy),
            task=task,
            algorithm=AlgorithmConfig(**ALGORITHM, train_rounds=args.train_rounds),
            update=UpdateConfig(**UPDATE),
            search_sampling=sampling,
            aggregation_sampling=sampling,
            verifier=VerifierConfig(num_workers=0),
            optimizer=optimizer,
            rollout_backend=backend,
        )
    timeout = timedelta(seconds=120)  # a hang fails fast instead of after gloo's 30 minutes
    strategy = (
        ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=timeout)
        if args.strategy == "fsdp2"
        else DDPStrategy(process_group_backend="gloo", timeout=timeout)
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS, logger=False, enable_checkpointing=False,
        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    batch_size = 4 if args.module == "sft" else 2
    trainer.fit(module, datamodule=ProblemDataModule(task, batch_size=batch_size, heldout_size=4, eval_batch_size=4))
    params = {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()  # full_tensor: a collective
        for name, p in module.policy.named_parameters()
    }
    if trainer.global_rank == 0:
        torch.save(params, out / "params.pt")
        sharded = all(isinstance(p, DTensor) for p in module.policy.parameters())
        (out / "sharded.json").write_text(json.dumps(sharded))


# ----------------------------------------------------------------------------- the tests
def _run_worker(strategy: str, module: str, policy_dir: Path, out: Path, train_rounds: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    args = ["--strategy", strategy, "--module", module, "--policy", str(policy_dir), "--out", str(out)]
    args += ["--train-rounds", str(train_rounds)]
    result = subprocess.run(
        [sys.executable, str(Path(__file__)), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]


def _reference_update(policy_dir: Path, out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(initial, final) parameters of one process updating on the union of both ranks' sequences, step by step."""
    from spiral_lit.runtime.models import PolicyConfig, load_policy
    from spiral_lit.training.update import PolicyUpdater, UpdateConfig

    model, tokenizer = load_policy(PolicyConfig(str(policy_dir)))
    model.train()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    config = UpdateConfig(**UPDATE)

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for global_step in range(STEPS):
        per_rank = [torch.load(out / f"sequences_rank{r}_step{global_step}.pt", weights_only=False) for r in (0, 1)]
        assert len(per_rank[0]) > len(per_rank[1]) > 0, [len(s) for s in per_rank]  # uneven micro-batch counts
        updater = PolicyUpdater(
            model, config, tokenizer.pad_token_id, 1.0, lambda t: t, lambda t: t, world_size=1
        )  # fmt: skip
        updater.update(per_rank[0] + per_rank[1], lambda loss: loss.backward(), step, torch.device("cpu"), seed=0)
    return initial, {n: p.detach() for n, p in model.named_parameters()}


def _reference_warm_start(policy_dir: Path, out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(initial, final) parameters of one process fitting the union of both ranks' warm-start examples."""
    import torch.nn.functional as F

    from spiral_lit.runtime.models import PolicyConfig, load_policy

    model, tokenizer = load_policy(PolicyConfig(str(policy_dir)))
    model.train()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for global_step in range(STEPS):
        per_rank = [torch.load(out / f"examples_rank{r}_step{global_step}.pt") for r in (0, 1)]
        assert len(per_rank[0][0]) > 3 and len(per_rank[1][0]) == 1  # rank 0: 2+ micro-batches, rank 1: one
        prompts, targets = per_rank[0][0] + per_rank[1][0], per_rank[0][1] + per_rank[1][1]
        batch = pack(prompts, targets, tokenizer.pad_token_id)
        logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits[:, :-1]
        nll_BT = F.cross_entropy(logits.float().transpose(1, 2), batch.targets_BT1, reduction="none")
        ((nll_BT * batch.completion_mask_BT1).sum() / batch.completion_mask_BT1.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), UPDATE["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return initial, {n: p.detach() for n, p in model.named_parameters()}


def _max_abs_difference(
    strategy: str, module: str, policy_dir: Path, out: Path, train_rounds: int = 1
) -> tuple[float, float]:
    """(max |distributed - reference| over parameters, max |reference update|)."""
    _run_worker(strategy, module, policy_dir, out, train_rounds)
    reference_fit = _reference_warm_start if module == "sft" else _reference_update
    initial, reference = reference_fit(policy_dir, out)
    distributed = torch.load(out / "params.pt")
    assert distributed.keys() == reference.keys()
    difference = max(float((distributed[n] - reference[n]).abs().max()) for n in reference)
    update = max(float((reference[n] - initial[n]).abs().max()) for n in reference)
    print(f"{module} {strategy}: max |2 processes - 1 process| = {difference:.3g}, max |update| = {update:.3g}")
    return difference, update


@pytest.mark.multiprocess
@pytest.mark.parametrize(("strategy", "train_rounds"), [("ddp", 1), ("fsdp2", 1), ("ddp", 2)])
def test_two_processes_make_the_update_of_one(tiny_policy, tmp_path: Path, strategy: str, train_rounds: int) -> None:
    """Also with two trained rounds of aggregation (docs/algorithm.md §10), whose round-2 traces are in the update."""
    difference, update = _max_abs_difference(strategy, "spiral", tiny_policy.path, tmp_path, train_rounds)
    recorded = torch.load(tmp_path / "sequences_rank0_step0.pt", weights_only=False)
    # Each kept prompt (of any refill batch) brings n_search 4 search traces and n_sets 2 x n_agg 2 per round.
    search, aggregation = sum(s.role == 0 for s in recorded), sum(s.role == 1 for s in recorded)
    assert search > 0 and aggregation == search * train_rounds
    assert update > 1e-3  # the comparison is not between two unchanged models
    assert difference < 1e-5
    assert json.loads((tmp_path / "sharded.json").read_text()) == (strategy == "fsdp2")
    for rank in (0, 1):
        same = json.loads((tmp_path / f"rollout_rank{rank}.json").read_text())
        assert len(same) == 2 * (2 + rank) and all(same), same


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_warm_start_as_one(tiny_policy, tmp_path: Path, strategy: str) -> None:
    difference, update = _max_abs_difference(strategy, "sft", tiny_policy.path, tmp_path)
    assert update > 1e-3
    assert difference < 1e-5


def _quickstart_metric_names(tiny_dir: Path, tmp_path: Path, devices: int) -> set[str]:
    """Scalar tags that ``fit`` of experiments/chain_sum/spiral.yaml, shortened, logs on ``devices`` processes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    save_dir = tmp_path / f"devices{devices}"
    overrides = {
        "trainer.max_steps": "2", "trainer.devices": str(devices), "trainer.strategy": "ddp" if devices > 1 else "auto",
        "trainer.logger.init_args.save_dir": str(save_dir), "trainer.enable_progress_bar": "false",
        "model.init_args.policy.path": str(tiny_dir), "model.init_args.search_sampling.max_new_tokens": "12",
        "model.init_args.aggregation_sampling.max_new_tokens": "12", "model.init_args.verifier.num_workers": "0",
        # A random model never answers correctly; keep its zero-advantage prompts so the update runs.
        "model.init_args.algorithm.drop_zero_signal": "false", "data.batch_size": "2",
    }  # fmt: skip
    command = [sys.executable, "-m", "spiral_lit", "fit", "--config", "experiments/chain_sum/spiral.yaml"]
    command += [f"--{key}={value}" for key, value in overrides.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]
    tags: set[str] = set()
    for path in save_dir.glob("**/events.out.tfevents*"):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        tags |= set(events.Tags()["scalars"])
    return tags


@pytest.mark.multiprocess
@pytest.mark.slow
def test_quickstart_spiral_stage_on_two_processes_logs_the_metrics_of_one(tmp_path: Path) -> None:
    tiny_dir = tmp_path / "tiny"
    built = subprocess.run(
        [sys.executable, "-m", "spiral_lit.tools.tiny", "--out", str(tiny_dir), "--n_corpus_problems", "200"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    one = _quickstart_metric_names(tiny_dir, tmp_path, devices=1)
    two = _quickstart_metric_names(tiny_dir, tmp_path, devices=2)
    assert {"reward/aggregation", "train/loss", "train/loss/aggregation", "time/generate"} <= one
    assert two == one


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--module", choices=["spiral", "sft"], required=True)
    parser.add_argument("--train-rounds", type=int, default=1)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--out", required=True)
    _worker(parser.parse_args())
