"""Evaluating with 2 CPU processes (gloo; DDP, and FSDP2) logs the same numbers as 1 process with the same seeds
(docs/algorithm.md §7.1, §8.3).

``python -m spiral_lit validate`` runs twice as a subprocess on a tiny random model, with
``devices: 1`` and with ``devices: 2`` under DDP or FSDP2 (``ModelParallelStrategy``); the logged metrics are
read back from TensorBoard. Under FSDP2 this once hung: transformers kept the ranks' ``generate`` calls in
lockstep, and the rank with fewer batches never came (spiral_lit.runtime.sharding.synced_generate).

5 held-out problems do not split evenly over 2 ranks (3 + 2) and land in other
batches than on 1 process ([0, 1], [2, 3], [4] vs [0, 2], [4] and [1, 3]): equality needs the
unpadded held-out sampler (each problem counted once) and per-problem seeds (a problem's
rollouts independent of its batch and rank). Tolerance 1e-6, TensorBoard's float32 scalars:
the float64 sums are only added in another order. (The one other source of a difference would
be a sampled token on a floating-point knife edge of the CDF, see spiral_lit.rollout.kv_cache;
it does not occur here.)
"""

from __future__ import annotations

import glob
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[2]
EVAL = {
    "n_samples": 3, "pass_k": [1, 2], "set_size": 2, "n_agg": 2, "budgets": [4],
    "rsa_population": 3, "rsa_set_size": 2, "rsa_rounds": 2,
}  # fmt: skip


STRATEGIES = {
    "ddp": "ddp",
    "fsdp2": {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
              "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}},
}  # fmt: skip
"""The two-process strategies: DDP, and FSDP2 (Lightning's ``ModelParallelStrategy``: each rank holds half of every
parameter, gathered whole for the rollouts of the evaluation)."""


def _config(tmp_path: Path, policy_dir: Path, devices: int, strategy: str) -> Path:
    """``strategy`` also picks the engine, for the 1-process reference too: the kv_cache engine refuses sharded
    policies, so FSDP2 evaluates with ``hf`` (``model.generate`` on the gathered weights)."""
    name = f"devices{devices}_{strategy}"
    config = {
        "trainer": {
            "accelerator": "cpu", "devices": devices, "strategy": STRATEGIES[strategy] if devices > 1 else "auto",
            "precision": "32-true", "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(tmp_path), "name": name, "version": ""}},
        },
        "model": {
            "class_path": "spiral_lit.SpiralModule",
            "init_args": {
                "policy": {"path": str(policy_dir)},
                "rollout_backend": "hf" if strategy == "fsdp2" else "kv_cache",
                "search_sampling": {"max_new_tokens": 8},
                "aggregation_sampling": {"max_new_tokens": 6},
                "verifier": {"num_workers": 0},
                "eval": EVAL,
            },
        },
        "data": {"task": {"class_path": "hash_task.VoteTask", "init_args": {"n_terms": 2, "digits": 2}},
                 "heldout_size": 5, "eval_batch_size": 2},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _validate(config: Path) -> dict[str, float]:
    """Run ``validate`` in a fresh process; the ``val/`` scalars it logged."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "spiral_lit", "validate", "--config", str(config)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    log_dir = yaml.safe_load(config.read_text())["trainer"]["logger"]["init_args"]
    scalars: dict[str, float] = {}
    for path in glob.glob(f"{log_dir['save_dir']}/{log_dir['name']}/**/events.out.tfevents*", recursive=True):
        events = EventAccumulator(path, size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag.startswith("val/"):
                (scalars[tag],) = [e.value for e in events.Scalars(tag)]
    return scalars


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_log_the_numbers_of_one(tiny_policy, tmp_path: Path, strategy: str) -> None:
    one = _validate(_config(tmp_path, tiny_policy.path, devices=1, strategy=strategy))
    two = _validate(_config(tmp_path, tiny_policy.path, devices=2, strategy=strategy))
    expected = {"val/search/pass@2", "val/search/maj@3", "val/sequential/accuracy@4", "val/aggregation/override"}
    expected |= {"val/rsa/accuracy@2", "val/rsa/majority@2", "val/rsa/tokens@2", "val/rsa/recovery"}
    assert expected <= set(one)
    assert set(two) == set(one)
    different = {
        tag: (one[tag], two[tag])
        for tag in one
        if not (math.isclose(one[tag], two[tag], abs_tol=1e-6) or (math.isnan(one[tag]) and math.isnan(two[tag])))
    }
    assert not different, different
    assert 0 < one["val/search/pass@1"] < 1  # not a trivially equal all-zero evaluation
