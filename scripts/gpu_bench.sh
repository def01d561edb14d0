#!/usr/bin/env bash
# GPU figures of docs/performance.md, on a machine with one CUDA GPU:
#
#   bash scripts/gpu_bench.sh RESULTS_DIR CASE [CASE ...]
#
# Makes the model folders (scripts/make_random_model.py) and the data (scripts/bench_data.py) in
# $WORK (default /tmp/shardtune-gpu-bench), then runs `shardtune bench` once per CASE (the names in
# case_args below), each under a time limit. Appends every bench.json as one line to
# RESULTS_DIR/bench.jsonl and the output of every case to RESULTS_DIR/bench.log.
set -u
RESULTS=${1:?usage: gpu_bench.sh RESULTS_DIR CASE [CASE ...]}; shift
WORK=${WORK:-/tmp/shardtune-gpu-bench}
LIMIT_S=${LIMIT_S:-300}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$RESULTS" "$WORK"

[ -f "$WORK/llama-1b/config.json" ] || $PY scripts/make_random_model.py llama-1b "$WORK/llama-1b"
[ -f "$WORK/llama-8b/config.json" ] || $PY scripts/make_random_model.py llama-8b "$WORK/llama-8b"
[ -f "$WORK/chat.jsonl" ] || $PY -c "import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; \
from bench_data import generate, generate_text; generate(Path('$WORK/chat.jsonl'), 12000); \
generate_text(Path('$WORK/text.jsonl'), 1500, 3000)"

# Shared by every case: one GPU, random weights, no eval; data tokenized by 8 processes.
COMMON="cluster.device=cuda cluster.nproc_per_node=1 model=local model.random_init=true data.num_proc=8 data.max_seq_len=4096"
ONE_B="$COMMON model.name_or_path=$WORK/llama-1b deepspeed=zero1"
EIGHT_B="$COMMON model.name_or_path=$WORK/llama-8b deepspeed=zero1 peft=lora"
CHAT_ALL="data.train_files=[$WORK/chat.jsonl] data.loss_on=all data.packing=true"  # every token trained
CHAT="data.train_files=[$WORK/chat.jsonl] data.packing=true"                      # assistant tokens trained
FIXED="data.train_files=[$WORK/text.jsonl] data.format=text data.packing=false"   # every row 4096 tokens

case_args() {
  case "$1" in
    smoke)           echo "--steps 3 --warmup 1 cluster.device=cuda cluster.nproc_per_node=1 data.packing=true" ;;
    1b-sdpa)         echo "$ONE_B $CHAT_ALL train.micro_batch_size=2 model.loss_chunks=8" ;;
    1b-flex)         echo "$ONE_B $CHAT_ALL train.micro_batch_size=2 model.loss_chunks=8 model.attn_implementation=flex_attention" ;;
    1b-flex-mb4)     echo "$ONE_B $CHAT_ALL train.micro_batch_size=4 model.loss_chunks=8 model.attn_implementation=flex_attention" ;;
    1b-flex-compile) echo "$ONE_B $CHAT_ALL train.micro_batch_size=2 model.loss_chunks=8 model.attn_implementation=flex_attention model.compile=true" ;;
    1b-flex-nodet)   echo "$ONE_B $CHAT_ALL train.micro_batch_size=2 model.loss_chunks=8 model.attn_implementation=flex_attention train.deterministic=false" ;;
    1b-zero0-flex)   echo "$ONE_B $CHAT_ALL deepspeed=zero0 train.micro_batch_size=2 model.loss_chunks=8 model.attn_implementation=flex_attention" ;;
    1b-vs-hf-chat)   echo "--vs hf $ONE_B $CHAT train.micro_batch_size=2 model.loss_chunks=8 model.attn_implementation=flex_attention" ;;
    1b-vs-hf-fixed)  echo "--vs hf $ONE_B $FIXED train.micro_batch_size=2" ;;
    8b-lora-sdpa)    echo "$EIGHT_B $CHAT_ALL train.micro_batch_size=1 model.loss_chunks=8" ;;
    8b-lora-flex)    echo "$EIGHT_B $CHAT_ALL train.micro_batch_size=1 model.loss_chunks=8 model.attn_implementation=flex_attention" ;;
    8b-lora-flex-mb2) echo "$EIGHT_B $CHAT_ALL train.micro_batch_size=2 model.loss_chunks=8 model.attn_implementation=flex_attention" ;;
    *) return 1 ;;
  esac
}

for name in "$@"; do
  args=$(case_args "$name") || { echo "unknown case: $name" | tee -a "$RESULTS/bench.log"; continue; }
  steps="--steps $STEPS --warmup $WARMUP"
  [ -n "${PROFILE:-}" ] && args="$args train.profile_steps=$PROFILE"  # torch.profiler over the last steps
  case "$args" in --steps*) steps="" ;; esac
  echo "=== $name: shardtune bench $steps $args" | tee -a "$RESULTS/bench.log"
  rm -rf "${WORK:?}/runs/$name"  # a case that fails must not report an earlier run's bench.json
  started=$(date +%s)
  # shellcheck disable=SC2086 # the overrides are meant to split
  timeout "$LIMIT_S" $PY -m launcher.cli bench $steps $args run.dir="$WORK/runs/$name" >> "$RESULTS/bench.log" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - started )) s" | tee -a "$RESULTS/bench.log"
  if [ -f "$WORK/runs/$name/bench.json" ]; then
    $PY -c "import json,sys; d=json.load(open(sys.argv[1])); d['case']=sys.argv[2]; print(json.dumps(d))" \
      "$WORK/runs/$name/bench.json" "$name" >> "$RESULTS/bench.jsonl"
    table="$WORK/runs/$name/ours-0/profile/rank0.txt"
    if [ -f "$table" ]; then { echo "=== $name"; cat "$table"; } >> "$RESULTS/profiles.txt"; fi
  fi  # (a failed case: bench.log has the end of its output)
done
