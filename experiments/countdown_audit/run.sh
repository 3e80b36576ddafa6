#!/usr/bin/env bash
# The countdown audit experiment, end to end on a CPU (README.md beside this file: results and times on 2 cores):
#   1. build a tiny Llama + tokenizer locally for countdown (no download),
#   2. warm-start both roles: search on worked solutions, aggregation on audits of 4 candidates (1200 steps),
#      then mostly the aggregation role (1200 steps),
#   3. train with SPIRAL (60 steps),
#   4. measure the warm start and the SPIRAL checkpoint on the same 200 held-out problems and seeds:
#      pass@k, majority vote, one aggregation of 4 candidates, recursive aggregation for 4 rounds,
#   5. print the table and whether the aggregated answers beat majority vote and improve over rounds.
# Stages run a fixed number of steps, so a busy machine takes longer but reaches the same result.
# Everything lands under runs/countdown_audit/ (TensorBoard: tensorboard --logdir runs/countdown_audit).
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/stages.sh
out=runs/countdown_audit
begin_run countdown_audit "$out"

stage "1/5: build the tiny model for countdown -> $out/tiny"
run python -m spiral_lit tiny --out "$out/tiny" --task spiral_lit.tasks.CountdownTask \
  --prompts.aggregation_target audit --tiny.vocab_size 512
stage "2a/5: warm start, both roles (1200 steps) -> $out/warmstart"
run python -m spiral_lit fit --config experiments/countdown_audit/warmstart.yaml
stage "2b/5: warm start, mostly aggregation (1200 steps) -> $out/warmstart_audit"
run python -m spiral_lit fit --config experiments/countdown_audit/warmstart_audit.yaml
stage "3/5: SPIRAL (60 steps) -> $out/spiral"
run python -m spiral_lit fit --config experiments/countdown_audit/spiral.yaml
stage "4/5: measure the warm start and SPIRAL on 200 held-out problems -> $out/compare"
run python -m spiral_lit compare --config experiments/countdown_audit/compare.yaml --out "$out/compare" \
  --checkpoints warmstart="$out/warmstart_audit/hf" spiral="$out/spiral/hf"
stage "5/5: results"
run python experiments/quickstart/summary.py "$out/compare"
stage "done: tensorboard --logdir $out; plots in $out/compare/*.png"
