#!/usr/bin/env bash
# The quickstart, end to end on a laptop CPU (~35 minutes on 2 cores):
#   1. build a tiny Llama + tokenizer locally (no download),
#   2. warm-start it on worked chain sums, both roles (stops at held-out pass@1 >= 0.5, <= 13 min),
#   3. measure the warm start's aggregated-answer accuracy on 200 held-out problems,
#   4. train it with SPIRAL for 20 minutes,
#   5. measure the same accuracy again.
# Everything lands under runs/quickstart/ (TensorBoard: tensorboard --logdir runs/quickstart).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=runs/quickstart

python -m spiral_lit.tiny --out "$out/tiny"
python -m spiral_lit fit --config experiments/quickstart/warmstart.yaml
python -m spiral_lit validate --config experiments/quickstart/warmstart.yaml \
  --ckpt_path "$out/warmstart/checkpoints/last.ckpt" --trainer.limit_val_batches 1.0 \
  --trainer.logger.init_args.name warmstart_eval
python -m spiral_lit validate --config experiments/quickstart/spiral.yaml \
  --trainer.logger.init_args.name spiral_eval_before
python -m spiral_lit fit --config experiments/quickstart/spiral.yaml
python -m spiral_lit validate --config experiments/quickstart/spiral.yaml \
  --model.init_args.policy.path "$out/spiral/hf" --trainer.logger.init_args.name spiral_eval_after
