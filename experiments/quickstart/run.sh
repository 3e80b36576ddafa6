#!/usr/bin/env bash
# The quickstart, end to end on a laptop CPU (README.md gives the measured time and table):
#   1. build a tiny Llama + tokenizer locally for countdown (no download),
#   2. warm-start its search role on worked solutions (600 steps),
#   3. warm-start both roles: the aggregator audits 4 candidates and keeps a right one by reference (1200 steps),
#   4. train with SPIRAL (60 steps),
#   5. measure the warm start and SPIRAL on the same 200 held-out problems and seeds, and print the table with the
#      three things the quickstart is meant to show (experiments/quickstart/summary.py).
# Everything lands under runs/quickstart/ (TensorBoard: tensorboard --logdir runs/quickstart).
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/stages.sh
out=runs/quickstart
begin_run quickstart "$out"

stage "1/5: build the tiny model for countdown -> $out/tiny"
run python -m spiral_lit tiny --config experiments/quickstart/tiny.yaml --out "$out/tiny"
# The warm starts run under bf16-mixed where this CPU does bf16 matmuls at least as fast as fp32 ones, else in fp32:
# without native bf16 they are ~100x slower (spiral_lit/runtime/cpu_precision.py). The stages' config.yaml records it.
precision=$(python -m spiral_lit cpu_precision)
stage "2/5: warm start, search role (600 steps, $precision) -> $out/warmstart_search"
run python -m spiral_lit fit --config experiments/quickstart/warmstart_search.yaml --trainer.precision "$precision"
stage "3/5: warm start, both roles (1200 steps, $precision) -> $out/warmstart"
run python -m spiral_lit fit --config experiments/quickstart/warmstart.yaml --trainer.precision "$precision"
stage "4/5: SPIRAL (60 steps) -> $out/spiral"
run python -m spiral_lit fit --config experiments/quickstart/spiral.yaml
stage "5/5: the warm start and SPIRAL on 200 held-out problems -> $out/compare"
run python -m spiral_lit compare --config experiments/quickstart/compare.yaml --out "$out/compare" \
  --checkpoints warmstart="$out/warmstart/hf" spiral="$out/spiral/hf"
run python experiments/quickstart/summary.py "$out/compare"
stage "done: tensorboard --logdir $out; plots in $out/compare/*.png"
