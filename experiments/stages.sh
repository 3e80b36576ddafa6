# Sourced by the experiments' run scripts (from the repository root): one preamble instead of a copy in each.
#   begin_run NAME OUT   refuse an existing OUT (an earlier run is never overwritten) and define `stage TEXT`,
#                        which announces a stage with a timestamp and NAME.
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
