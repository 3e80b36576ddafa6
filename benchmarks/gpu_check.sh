#!/usr/bin/env bash
# GPU check (benchmarks/README.md, "GPU check"): greedy parity of the kv_cache, hf and vllm backends, a 5-step
# bf16 SPIRAL fit under FSDP1 and the rollout benchmark, on one GPU in under 8 minutes; one summary table.
# Usage: bash benchmarks/gpu_check.sh [--device cpu] [--stages parity fit rollout] [--out FILE] (--help for all)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
