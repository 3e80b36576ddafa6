#!/usr/bin/env bash
# The countdown select variant, end to end on a CPU (README.md beside this file: results and times on 2 cores):
#   1. build a tiny Llama + tokenizer locally for countdown, with the step verdicts in its corpus,
#   2. warm-start both roles, the aggregator on step-by-step audits that keep a candidate by reference (1200 steps),
#   3. train with SPIRAL (60 steps),
#   4. measure the warm start and SPIRAL on the same 200 held-out problems and seeds, and print the table.
# Everything lands under runs/countdown_select/ (TensorBoard: tensorboard --logdir runs/countdown_select).
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/stages.sh
out=runs/countdown_select
begin_run countdown_select "$out"

stage "1/4: build the tiny model for countdown -> $out/tiny"
run python -m spiral_lit tiny --out "$out/tiny" --task spiral_lit.tasks.CountdownTask --task.verdict_steps true \
  --task.faked_wrong 0.5 --prompts.aggregation_target select --tiny.vocab_size 512
stage "2/4: warm start, both roles (1200 steps) -> $out/warmstart"
run python -m spiral_lit fit --config experiments/countdown_audit/select_warmstart.yaml
stage "3/4: SPIRAL (60 steps) -> $out/spiral"
run python -m spiral_lit fit --config experiments/countdown_audit/select_spiral.yaml
stage "4/4: measure the warm start and SPIRAL on 200 held-out problems -> $out/compare"
run python -m spiral_lit compare --config experiments/countdown_audit/select_compare.yaml --out "$out/compare" \
  --checkpoints warmstart="$out/warmstart/hf" spiral="$out/spiral/hf"
run python experiments/quickstart/summary.py "$out/compare"
stage "done: tensorboard --logdir $out; plots in $out/compare/*.png"
