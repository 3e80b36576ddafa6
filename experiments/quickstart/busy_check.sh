#!/usr/bin/env bash
# Does the quickstart's outcome depend on how busy the machine is? It should not: every stage stops on a step count
# (the wall-clock caps are safety nets far above the idle times) and every random draw is seeded, so a busy machine
# only makes the same run later. This checks it: a shortened quickstart (the same configs and stages, fewer steps
# and held-out problems) runs twice from the same tiny model, alone and then beside a competing CPU-bound process
# (a one-thread busy loop), and every stage's weights and the evaluation's per-problem results are compared bit for
# bit. Both runs take the precision timed once at the start (a timing, which a busy machine could change).
#   bash experiments/quickstart/busy_check.sh [OUT]     # OUT: runs/busy_check; ~15 min on 2 cores
# Steps per stage (defaults: 100, 40, 3) and held-out problems (40): SEARCH_STEPS, BOTH_STEPS, SPIRAL_STEPS, PROBLEMS.
set -euo pipefail
cd "$(dirname "$0")/../.."
source experiments/stages.sh
repo=$PWD
out=$(realpath -m "${1:-runs/busy_check}")
begin_run busy_check "$out"
search_steps=${SEARCH_STEPS:-100}
both_steps=${BOTH_STEPS:-40}
spiral_steps=${SPIRAL_STEPS:-3}
problems=${PROBLEMS:-40}
configs=$repo/experiments/quickstart
precision=$(python -m spiral_lit cpu_precision)

# The quickstart's stages with fewer steps, in the current directory (its configs read and write runs/quickstart/).
quickstart_short() {
  run python -m spiral_lit tiny --config "$configs/tiny.yaml" --out runs/quickstart/tiny
  run python -m spiral_lit fit --config "$configs/warmstart_search.yaml" --trainer.precision "$precision" \
    --trainer.max_steps "$search_steps" --trainer.val_check_interval "$search_steps"
  run python -m spiral_lit fit --config "$configs/warmstart.yaml" --trainer.precision "$precision" \
    --trainer.max_steps "$both_steps" --trainer.val_check_interval "$both_steps"
  run python -m spiral_lit fit --config "$configs/spiral.yaml" --trainer.max_steps "$spiral_steps"
  run python -m spiral_lit compare --config "$configs/compare.yaml" --out runs/quickstart/compare \
    --checkpoints warmstart=runs/quickstart/warmstart/hf spiral=runs/quickstart/spiral/hf \
    -- --data.heldout_size "$problems"
}

competitor=
trap '[ -z "$competitor" ] || kill "$competitor" 2>/dev/null || true' EXIT
for arm in alone busy; do
  mkdir -p "$out/$arm"
  if [ "$arm" = busy ]; then
    python -c "while True: pass" &
    competitor=$!
  fi
  stage "$arm: the quickstart with $search_steps / $both_steps / $spiral_steps steps ($precision), $problems problems"
  start=$(date +%s)
  (cd "$out/$arm" && quickstart_short) > "$out/$arm/log.txt" 2>&1
  echo "$arm $(( $(date +%s) - start ))" >> "$out/seconds.txt"
  if [ -n "$competitor" ]; then kill "$competitor"; competitor=; fi
done

stage "compare the two runs' outputs"
python - "$out/alone/runs/quickstart" "$out/busy/runs/quickstart" "$out/seconds.txt" <<'EOF'
import sys
from pathlib import Path

from safetensors.torch import load_file

alone, busy, seconds = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
took = dict(line.split() for line in seconds.read_text().splitlines())
print(f"alone: {int(took['alone']) / 60:.1f} min, beside a busy loop: {int(took['busy']) / 60:.1f} min")
same = True
for stage in ("tiny", "warmstart_search/hf", "warmstart/hf", "spiral/hf"):
    a, b = load_file(alone / stage / "model.safetensors"), load_file(busy / stage / "model.safetensors")
    equal = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    same &= equal
    print(f"{stage:22s} weights {'bit-identical' if equal else 'DIFFER'} ({len(a)} tensors)")
for name in ("metrics.csv", "per_problem.csv"):
    equal = (alone / "compare" / name).read_bytes() == (busy / "compare" / name).read_bytes()
    same &= equal
    print(f"compare/{name:15s} {'byte-identical' if equal else 'DIFFER'}")
print("the outcome did not depend on the load" if same else "the outcome DEPENDED on the load")
sys.exit(0 if same else 1)
EOF
