#!/bin/bash
# Launch overhead and run-directory writes per step: another revision against this checkout.
#
#   bash scripts/compare_launch.sh REV [ROUNDS]      e.g. bash scripts/compare_launch.sh 184d9a5 3
#
# 1. Wall time of a whole 2-step launch on the tiny model with 2 CPU ranks, REV and this checkout
#    alternated ROUNDS times (the same venv; REV checked out in a temporary git worktree).
# 2. Heartbeat writes: strace counts heartbeat renames in the run directory and on node-local storage
#    (/dev/shm), and all opens/renames under the run directory, in a 4-step, 2-rank run with 8
#    accumulation steps (needs strace). ROUNDS=0 skips part 1.
set -u
REV=${1:?usage: compare_launch.sh REV [ROUNDS]}
ROUNDS=${2:-3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=$HERE/.venv/bin/python
OUT=$(mktemp -d)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HERE/.cache/torch_extensions} OMP_NUM_THREADS=1
git -C "$HERE" worktree add -q "$OUT/before" "$REV"
trap 'git -C "$HERE" worktree remove --force "$OUT/before"; rm -rf "$OUT"' EXIT
QUIET="eval.baseline=false checkpoint.every_steps=0 checkpoint.save_final=false checkpoint.export_final=false cluster.nproc_per_node=2 eval.prompts_file=null eval.general_files=[] eval.max_batches=1"
for round in $(seq "$ROUNDS"); do
  for which in before after; do
    dir=$HERE; [ $which = before ] && dir=$OUT/before
    start=$(date +%s.%N)
    (cd "$dir" && PYTHONPATH=$dir $PY -m launcher.cli train run.dir="$OUT/launch_${which}_${round}" train.max_steps=2 $QUIET >"$OUT/launch.log" 2>&1)
    code=$?
    echo "launch $which round $round: $(echo "$(date +%s.%N) - $start" | bc) s (exit $code)"
  done
done
for which in before after; do
  dir=$HERE; [ $which = before ] && dir=$OUT/before
  run=$OUT/hb_$which
  (cd "$dir" && PYTHONPATH=$dir strace -f -qq -e trace=rename,renameat,renameat2,openat -o "$run.strace" \
     $PY -m launcher.cli train run.dir="$run" train.max_steps=4 train.grad_accum=8 train.micro_batch_size=1 $QUIET >"$run.log" 2>&1)
  echo "$which: exit $?; heartbeat renames in the run directory $(grep "$run/heartbeats/" "$run.strace" | grep -c rename)" \
       "(node summaries: $(grep "$run/heartbeats/node-" "$run.strace" | grep -c rename))," \
       "on node-local storage $(grep -E 'shardtune-[0-9]+/heartbeats-' "$run.strace" | grep -c rename) over 4 steps x 2 ranks;" \
       "opens and renames under the run directory $(grep -c "$run" "$run.strace")"
done
