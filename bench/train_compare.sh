#!/usr/bin/env bash
# Train several presets on the same prepared data with the same budget, then export and decode
# each: the recipe behind the GPU comparisons in docs/results.md.
#
#   bench/train_compare.sh DATA OUT MAX_STEPS PRESET [PRESET ...]
# DATA holds {train,dev,test}/shards.list, units/, cmvn.json (u2moe prep ...). Extra trainer
# overrides come from $TRAIN_SET (space-separated key=value); $MAX_MINUTES adds a training-time
# budget per preset (evaluation and checkpoints excluded); $GPUS > 1 trains each preset with that
# many processes; $TRAIN_ARGS are more `u2moe train` arguments (e.g. "--max-gpu-memory-gb 24").
# $CARDS ("0 1 2": one card per preset, in preset order) runs the presets side by side, each on
# its card with its own rendezvous port ($MASTER_PORT + its index), and decodes each preset's sets
# and chunk sizes at once on its card; without it the presets run one after another. With $GPUS > 1
# a "card" is a list: CARDS="0,1 2,3" GPUS=2 runs two 2-GPU jobs side by side.
# Decoding: $DECODE_MODES (default ctc_greedy,attention_rescoring) at each chunk size of
# $DECODE_CHUNKS (default -1: full context; "none": no decoding, e.g. for throughput runs), for
# each set of $DECODE_SETS (default test; e.g. "dev test"). DECODE_ONLY=1 skips training and decodes
# the runs already in OUT (e.g. when training and decoding must be separate calls). $EXPORT_ARGS
# are more `u2moe export` arguments (e.g. "--tag step_00006000"); EQUAL_STEPS=1 exports every
# preset at the last checkpoint step they all have (train with train.save_interval set), so that
# runs cut short by a time limit are still compared at equal steps.
# Per preset: OUT/PRESET/ (metrics.jsonl, model.pt, decode_SET_chunkN/), OUT/PRESET.*.log,
# OUT/PRESET.metrics.jsonl (bench/plot_dev_loss.py plots them), and a
# summary of throughput and error rates in OUT/summary.txt.
set -euo pipefail
data=$(realpath "$1"); out=$(realpath -m "$2"); steps=$3; shift 3
presets=("$@")
repo=$(cd "$(dirname "$0")/.." && pwd)
# One GPU: no ZeRO, bf16 autocast (the one-GPU default; with CUDA graphs, DS_CONFIG=zero0_pure_bf16.json
# and TRAIN_SET with data.batch.type=bucket train.cuda_graphs=true); several: ZeRO-2 bf16.
ds_default=$repo/ds_configs/zero0_bf16.json
[ "${GPUS:-1}" -gt 1 ] && ds_default=$repo/ds_configs/zero2_bf16.json
ds=$(realpath "${DS_CONFIG:-$ds_default}")
device=$(python3 -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
read -r -a cards <<< "${CARDS:-}"
if [ ${#cards[@]} -gt 0 ] && [ ${#cards[@]} -ne ${#presets[@]} ]; then
  echo "CARDS has ${#cards[@]} cards for ${#presets[@]} presets" >&2; exit 2
fi
sets=()
for kv in ${TRAIN_SET:-}; do sets+=(--set "$kv"); done
vocab=$(grep -c . "$data/units/units.txt")
mkdir -p "$out"
cd /tmp

train() {  # PRESET PORT
  local preset=$1 exp=$out/$1 start launcher=(python3 -m u2moe)
  if [ "${GPUS:-1}" -gt 1 ]; then
    # Under CUDA_VISIBLE_DEVICES the launcher takes those cards, and only without --num_gpus.
    local gpus=(--num_gpus "$GPUS"); [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && gpus=()
    launcher=(python3 -m deepspeed.launcher.runner "${gpus[@]}" --master_port "$2" --no_local_rank --module u2moe)
  fi
  start=$(date +%s)
  # shellcheck disable=SC2086
  MASTER_PORT=$2 "${launcher[@]}" train ${MAX_MINUTES:+--max-minutes "$MAX_MINUTES"} ${TRAIN_ARGS:-} --config "$preset" --ds-config "$ds" --train-shards "$data/train/shards.list" \
    --dev-shards "$data/dev/shards.list" --units "$data/units" --cmvn "$data/cmvn.json" --exp-dir "$exp" \
    --max-steps "$steps" --set model.vocab_size="$vocab" "${sets[@]}" 2>&1 | grep --line-buffered -v "INFO\] \[" |
    if [ ${#cards[@]} -gt 0 ]; then cat > "$exp.train.log"; else tee "$exp.train.log"; fi
  { echo "$preset train wall $(( $(date +%s) - start )) s"
    grep -h "audio_s/s" "$exp.train.log" | tail -n 3
    grep -h "s of audio in" "$exp.train.log" || true; } > "$exp.summary.txt"  # the run's exact rate
  cp "$exp/metrics.jsonl" "$out/$preset.metrics.jsonl"  # for bench/plot_dev_loss.py, beside the logs
}

decode() {  # PRESET EXPORT_ARGS...
  local preset=$1 exp=$out/$1 set chunk; shift
  python3 -m u2moe export --exp-dir "$exp" --out "$exp/model.pt" "$@" > "$exp.export.log" 2>&1 || { cat "$exp.export.log" >&2; return 1; }
  for set in ${DECODE_SETS:-test}; do
    for chunk in ${DECODE_CHUNKS:--1}; do
      python3 -m u2moe decode --model "$exp/model.pt" --shards "$data/$set/shards.list" --device "$device" \
        --modes "${DECODE_MODES:-ctc_greedy,attention_rescoring}" --chunk-size "$chunk" --batch-size 32 \
        --out "$exp/decode_${set}_chunk$chunk" > "$exp.decode_${set}_chunk$chunk.log" 2>&1 &
      [ ${#cards[@]} -gt 0 ] || wait $!  # one at a time unless each preset has its card
    done
  done
  wait
  for set in ${DECODE_SETS:-test}; do
    for chunk in ${DECODE_CHUNKS:--1}; do
      echo "$preset $set, chunk $chunk ($(grep -h "^wrote" "$exp.export.log")):"
      grep -E "CER|utterances" "$exp.decode_${set}_chunk$chunk.log"
    done
  done >> "$exp.summary.txt"
}

each() {  # FUNCTION: runs it for every preset (side by side on $CARDS, else in turn), then waits
  local i failed=0 pids=()
  for i in "${!presets[@]}"; do
    if [ ${#cards[@]} -gt 0 ]; then
      CUDA_VISIBLE_DEVICES=${cards[$i]} "$1" "${presets[$i]}" $(( ${MASTER_PORT:-29500} + i )) & pids+=($!)
    else
      "$1" "${presets[$i]}" "${MASTER_PORT:-29500}"
    fi
  done
  for i in "${pids[@]}"; do wait "$i" || failed=1; done
  return $failed
}

last_step() {  # PRESET: the step of its latest checkpoint
  find "$out/$1/checkpoints" -maxdepth 1 -name 'step_*' -printf '%f\n' | sed 's/^step_0*//' | sort -n | tail -n 1
}

decode_at() {  # PRESET PORT: decode with $EXPORT_ARGS, or at $tag
  # shellcheck disable=SC2086
  decode "$1" ${tag:+--tag "$tag"} ${EXPORT_ARGS:-}
}

[ "${DECODE_ONLY:-0}" = 1 ] || each train || echo "a training run failed: see $out/*.train.log" >&2
[ "${DECODE_CHUNKS:-}" = none ] && { cat "$out"/*.summary.txt > "$out/summary.txt"; cat "$out/summary.txt"; exit 0; }
tag=
if [ "${EQUAL_STEPS:-0}" = 1 ]; then
  common=$(for p in "${presets[@]}"; do last_step "$p"; done | sort -n | head -n 1)
  tag=$(printf "step_%08d" "$common")
  echo "decoding every preset at its checkpoint $tag (the last step all of them have)" | tee "$out/equal_step.txt"
fi
each decode_at
cat "$out"/*.summary.txt > "$out/summary.txt"
cat "$out/summary.txt"
