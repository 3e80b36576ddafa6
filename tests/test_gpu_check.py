"""benchmarks/gpu_check.py: its comparison logic, and the whole script end to end on CPU (small settings).

The GPU run itself needs a GPU; these checks make sure the script that runs there works: every stage runs
and reports, and on CPU the kv_cache and hf backends give the same greedy ids.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_first_mismatch_names_prompt_sample_and_token() -> None:
    check = _gpu_check()
    a = [[[1, 2, 3], [1, 2, 3]], [[4, 5]]]
    assert check.first_mismatch(a, a) is None
    b = [[[1, 2, 3], [1, 9, 3]], [[4, 5]]]
    assert check.first_mismatch(a, b) == {"prompt": 0, "sample": 1, "position": 1}
    shorter = [[[1, 2, 3], [1, 2]], [[4, 5]]]  # one trace stopped early (EOS) in one backend only
    assert check.first_mismatch(a, shorter) == {"prompt": 0, "sample": 1, "position": 2}


def test_a_missing_backend_is_skipped_and_a_broken_one_fails() -> None:
    check = _gpu_check()
    ids = {"kv_cache": [[[1, 2]]], "hf": [[[1, 2]]]}
    pairs = check.compare_backends(ids, {"vllm": "skipped: vllm not installed"})
    assert {k: p["status"] for k, p in pairs.items()} == {"kv_cache=hf": "pass", "vllm=hf": "skipped",
                                                          "vllm=kv_cache": "skipped"}  # fmt: skip
    pairs = check.compare_backends(ids, {"vllm": "RuntimeError: no kernel"})
    assert pairs["vllm=hf"]["status"] == "fail" and "no kernel" in pairs["vllm=hf"]["reason"]


@pytest.mark.slow
def test_the_script_runs_every_stage_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--work", str(tmp_path), "--out", str(out)]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| parity kv_cache=hf | pass |" in done.stdout
    summary = json.loads(out.read_text())
    stages = summary["stages"]
    assert {"device", "build", "parity", "fit", "rollout"} <= set(stages)
    assert stages["parity"]["data"]["pairs"]["kv_cache=hf"]["status"] == "pass"
    assert stages["fit"]["status"] == "pass" and stages["fit"]["data"]["steps_logged"] == 5
    engines = {r["engine"] for r in stages["rollout"]["data"]["results"] if r["tokens_per_s"]}
    assert {"hf", "kv_cache"} <= engines
