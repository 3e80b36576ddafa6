#!/usr/bin/env bash
# The former quickstart (chain sums), end to end on a laptop CPU (~25 minutes on 2 cores):
#   1. build a tiny Llama + tokenizer locally (no download),
#   2. warm-start its search role on worked chain sums until held-out pass@1 >= 0.45 (<= 11 min),
#   3. warm-start both roles (aggregation examples with deliberately wrong candidates, ~3 min),
#   4. measure the warm start on 200 held-out problems (pass@1, maj@8, pass@8, aggregated answer),
#   5. train with SPIRAL for 1000 steps or 20 minutes, whichever comes first (17 min on 2 cores),
#   6. measure the aggregated-answer accuracy again on the same 200 problems and seeds.
# Everything lands under runs/chain_sum/ (TensorBoard: tensorboard --logdir runs/chain_sum).
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/stages.sh
out=runs/chain_sum
begin_run chain_sum "$out"

stage "1/7: build the tiny model -> $out/tiny"
run python -m spiral_lit tiny --out "$out/tiny"
# bf16-mixed where this CPU runs bf16 matmuls at least as fast as fp32 ones, else fp32 (as the quickstart's run.sh).
precision=$(python -m spiral_lit cpu_precision)
stage "2/7: warm start, search role (until held-out pass@1 >= 0.45, <= 11 min, $precision) -> $out/warmstart_search"
run python -m spiral_lit fit --config experiments/chain_sum/warmstart_search.yaml --trainer.precision "$precision"
stage "3/7: warm start, both roles (120 steps, $precision) -> $out/warmstart"
run python -m spiral_lit fit --config experiments/chain_sum/warmstart.yaml --trainer.precision "$precision"
stage "4/7: evaluate the warm start on 200 held-out problems"
run python -m spiral_lit validate --config experiments/chain_sum/warmstart.yaml \
  --model.init_args.policy.path "$out/warmstart/hf" --trainer.limit_val_batches 1.0 \
  --trainer.logger.init_args.name warmstart_eval
stage "5/7: evaluate the aggregated answer before SPIRAL"
run python -m spiral_lit validate --config experiments/chain_sum/spiral.yaml \
  --trainer.logger.init_args.name spiral_eval_before
stage "6/7: SPIRAL (1000 steps or 20 min) -> $out/spiral"
run python -m spiral_lit fit --config experiments/chain_sum/spiral.yaml
stage "7/7: evaluate the aggregated answer after SPIRAL"
run python -m spiral_lit validate --config experiments/chain_sum/spiral.yaml \
  --model.init_args.policy.path "$out/spiral/hf" --trainer.logger.init_args.name spiral_eval_after
stage "done: tensorboard --logdir $out"
