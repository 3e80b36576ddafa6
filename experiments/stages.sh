# Sourced by the experiments' run scripts (from the repository root): one preamble instead of a copy in each.
#   begin_run NAME OUT   refuse an existing OUT (an earlier run is never overwritten) and define `stage TEXT`,
#                        which announces a stage with a timestamp and NAME.
#   run COMMAND...       run one stage's command. A Ctrl-C or a `kill` of the script reaches the running stage
#                        once (a training stage then saves last.ckpt and exits), and the script stops there
#                        instead of starting the next stage (exit status 130 or 143).
# When the output is a file (a job's log), the runs also print a progress line every 30 s
# (spiral_lit.reliability.progress).
begin_run() {
  run_name=$1
  if [ -e "$2" ]; then
    echo "error: $2 already exists (an earlier run); move it away or delete it (rm -r $2) to run again" >&2
    exit 2
  fi
}
stage() { echo "[$(date '+%Y-%m-%d %H:%M:%S')] $run_name stage $1"; }

# Job control puts each stage in its own process group, so a Ctrl-C in a terminal reaches the script alone and
# _stop_stage forwards it once (the stage would otherwise get it twice); without job control a background stage
# would ignore SIGINT.
set -m
stage_pid=
run() {
  "$@" &
  stage_pid=$!
  wait "$stage_pid"
  stage_pid=
}
_stop_stage() {
  if [ -n "$stage_pid" ]; then
    kill -"$1" "$stage_pid" 2>/dev/null || true
    wait "$stage_pid" || true
  fi
  echo "[$(date '+%Y-%m-%d %H:%M:%S')] ${run_name:-run} stopped by SIG$1; later stages not started" >&2
  exit "$2"
}
trap '_stop_stage INT 130' INT
trap '_stop_stage TERM 143' TERM
