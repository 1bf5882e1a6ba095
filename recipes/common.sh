#!/usr/bin/env bash
# Shared by the recipes (sourced after parse_options.sh): the u2moe command, the launcher, the
# train / export / decode stages. Expects: stage stop_stage data exp config ds_config gpus
# expert_parallel_size train_opts average_num decode_modes test_sets nj utts_per_shard dry_run.
recipes_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(dirname "$recipes_dir")
if [ -n "${U2MOE:-}" ]; then u2moe=$U2MOE
elif [ -x "$repo_dir/.venv/bin/u2moe" ]; then u2moe=$repo_dir/.venv/bin/u2moe
else u2moe=u2moe; fi
# The launcher and the deepspeed command come from the same environment as u2moe.
export PATH="$(dirname "$(command -v "$u2moe")"):$PATH"

# run CMD...: print it; run it unless --dry-run true.
run() {
  echo "+ $*"
  if [ "$dry_run" != true ]; then "$@"; fi
}

# stage_on N: whether stage N is within --stage/--stop-stage.
stage_on() { [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]; }

# prep_stages: shards (1), units (2), cmvn (3) for the Kaldi dirs $kaldi/{train,dev,<test_sets>}
# ($kaldi: $data unless the recipe sets it).
prep_stages() {
  local unit_type=$1 vocab_size=$2 set kaldi=${kaldi:-$data}
  if stage_on 1; then
    for set in train dev $test_sets; do
      run "$u2moe" prep shards --data-dir "$kaldi/$set" --out "$data/shards/$set" --jobs "$nj" \
        --utts-per-shard "$utts_per_shard"
    done
  fi
  if stage_on 2; then
    if [ "$unit_type" = char ]; then
      run "$u2moe" prep units --text "$kaldi/train/text" --out "$data/units" --type char
    else
      run "$u2moe" prep units --text "$kaldi/train/text" --out "$data/units" --type "$unit_type" \
        --vocab-size "$vocab_size"
    fi
  fi
  if stage_on 3; then
    run "$u2moe" prep cmvn --shards "$data/shards/train/shards.list" --out "$data/cmvn.json" \
      --jobs "$nj" ${cmvn_max_utts:+--max-utts "$cmvn_max_utts"}
  fi
}

# model_stages: train (4), average + export (5), decode (6).
model_stages() {
  local set
  if stage_on 4; then
    # shellcheck disable=SC2086  # train_opts is a list of extra `u2moe train` arguments
    run "$repo_dir/launch/train.sh" ${gpus:+--gpus "$gpus"} -- \
      --config "$config" --ds-config "$ds_config" \
      --train-shards "$data/shards/train/shards.list" --dev-shards "$data/shards/dev/shards.list" \
      --units "$data/units" --cmvn "$data/cmvn.json" --exp-dir "$exp" \
      --set train.expert_parallel_size="$expert_parallel_size" $train_opts
  fi
  if stage_on 5; then
    run "$u2moe" export --exp-dir "$exp" --out "$exp/avg_${average_num}.pt" --average "$average_num"
  fi
  if stage_on 6; then
    local device=cpu
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then device=cuda; fi
    for set in $test_sets; do
      run "$u2moe" decode --model "$exp/avg_${average_num}.pt" --shards "$data/shards/$set/shards.list" \
        --modes "$decode_modes" --device "$device" --out "$exp/decode_$set"
    done
  fi
}
