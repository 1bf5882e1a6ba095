#!/usr/bin/env bash
# Train several presets on the same prepared data with the same budget, one after another on this
# machine, then export and decode each: the recipe behind the one-GPU comparisons in docs/.
#
#   bench/train_compare.sh DATA OUT MAX_STEPS PRESET [PRESET ...]
# DATA holds {train,dev,test}/shards.list, units/, cmvn.json (u2moe prep ...). Extra trainer
# overrides come from $TRAIN_SET (space-separated key=value); $MAX_MINUTES adds a training-time
# budget per preset (evaluation and checkpoints excluded); $GPUS > 1 trains with that many
# processes; $TRAIN_ARGS are more `u2moe train` arguments (e.g. "--max-gpu-memory-gb 24").
# Decoding: $DECODE_MODES (default ctc_greedy,attention_rescoring) at each chunk size of
# $DECODE_CHUNKS (default -1: full context; "none": no decoding, e.g. for throughput runs), for
# each set of $DECODE_SETS (default test; e.g. "dev test"). DECODE_ONLY=1 skips training and decodes
# the runs already in OUT (e.g. when training and decoding must be separate calls). $EXPORT_ARGS
# are more `u2moe export` arguments (e.g. "--tag step_00006000": decode every preset at the same step).
# Per preset: OUT/PRESET/ (metrics.jsonl, model.pt, decode_SET_chunkN/), OUT/PRESET.*.log,
# OUT/PRESET.metrics.jsonl (bench/plot_dev_loss.py plots them), and a
# summary of throughput and error rates in OUT/summary.txt.
set -euo pipefail
data=$(realpath "$1"); out=$(realpath -m "$2"); steps=$3; shift 3
repo=$(cd "$(dirname "$0")/.." && pwd)
# One GPU: no ZeRO, bf16 autocast (the one-GPU default; with CUDA graphs, DS_CONFIG=zero0_pure_bf16.json
# and TRAIN_SET with data.batch.type=bucket train.cuda_graphs=true); several: ZeRO-2 bf16.
ds_default=$repo/ds_configs/zero0_bf16.json
[ "${GPUS:-1}" -gt 1 ] && ds_default=$repo/ds_configs/zero2_bf16.json
ds=$(realpath "${DS_CONFIG:-$ds_default}")
device=$(python3 -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
# $GPUS > 1: one process per GPU through the deepspeed launcher (on the cards of
# $CUDA_VISIBLE_DEVICES where set, so that several runs can share a machine).
launcher=(python3 -m u2moe)
if [ "${GPUS:-1}" -gt 1 ]; then
  # Under CUDA_VISIBLE_DEVICES the launcher takes those cards, and only without --num_gpus.
  gpus=(--num_gpus "$GPUS"); [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && gpus=()
  launcher=(python3 -m deepspeed.launcher.runner "${gpus[@]}" --master_port "${MASTER_PORT:-29500}" --no_local_rank --module u2moe)
fi
mkdir -p "$out"
cd /tmp
for preset in "$@"; do
  exp=$out/$preset
  sets=()
  for kv in ${TRAIN_SET:-}; do sets+=(--set "$kv"); done
  vocab=$(grep -c . "$data/units/units.txt")
  if [ "${DECODE_ONLY:-0}" != 1 ]; then
    start=$(date +%s)
    # shellcheck disable=SC2086
    "${launcher[@]}" train ${MAX_MINUTES:+--max-minutes "$MAX_MINUTES"} ${TRAIN_ARGS:-} --config "$preset" --ds-config "$ds" --train-shards "$data/train/shards.list" \
      --dev-shards "$data/dev/shards.list" --units "$data/units" --cmvn "$data/cmvn.json" --exp-dir "$exp" \
      --max-steps "$steps" --set model.vocab_size="$vocab" "${sets[@]}" 2>&1 | grep -v "INFO\] \[" | tee "$exp.train.log"
    echo "$preset train wall $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
    cp "$exp/metrics.jsonl" "$out/$preset.metrics.jsonl"  # for bench/plot_dev_loss.py, beside the logs
    grep -h "audio_s/s" "$exp.train.log" | tail -n 3 >> "$out/summary.txt"
    grep -h "s of audio in" "$exp.train.log" >> "$out/summary.txt" || true  # the run's exact rate
  fi
  [ "${DECODE_CHUNKS:-}" = none ] && continue
  # shellcheck disable=SC2086
  python3 -m u2moe export --exp-dir "$exp" --out "$exp/model.pt" ${EXPORT_ARGS:-}
  for set in ${DECODE_SETS:-test}; do
    for chunk in ${DECODE_CHUNKS:--1}; do
      python3 -m u2moe decode --model "$exp/model.pt" --shards "$data/$set/shards.list" --device "$device" \
        --modes "${DECODE_MODES:-ctc_greedy,attention_rescoring}" --chunk-size "$chunk" --batch-size 32 \
        --out "$exp/decode_${set}_chunk$chunk" 2>&1 | tee "$exp.decode_${set}_chunk$chunk.log" | tail -n 4
      echo "$preset $set, chunk $chunk:" >> "$out/summary.txt"
      grep -E "CER|utterances" "$exp.decode_${set}_chunk$chunk.log" >> "$out/summary.txt"
    done
  done
done
cat "$out/summary.txt"
