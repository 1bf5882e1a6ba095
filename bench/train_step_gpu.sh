#!/usr/bin/env bash
# `u2moe bench train` for several presets and data-config variants on one GPU: loader rate,
# step rate on in-memory batches, host syncs per step, profiler summary. JSON per run in OUT.
#
#   bench/train_step_gpu.sh DATA OUT PRESET [PRESET ...]
# DATA holds {train}/shards.list, units/, cmvn.json. $VARIANTS: space-separated names, each a
# comma-separated list of key=value overrides or "base" (default: "base"); $PROFILE: steps to
# profile (default 5); $TRAIN_SET: overrides for every run.
set -euo pipefail
data=$(realpath "$1"); out=$(realpath -m "$2"); shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
# One GPU: no ZeRO, bf16 autocast (the leanest step); several: ZeRO-2 bf16.
ds_default=$repo/ds_configs/zero0_bf16.json
[ "${GPUS:-1}" -gt 1 ] && ds_default=$repo/ds_configs/zero2_bf16.json
ds=$(realpath "${DS_CONFIG:-$ds_default}")
mkdir -p "$out"
cd /tmp
vocab=$(grep -c . "$data/units/units.txt")
for preset in "$@"; do
  for variant in ${VARIANTS:-base}; do
    sets=(--set model.vocab_size="$vocab")
    for kv in ${TRAIN_SET:-} $( [ "$variant" = base ] || echo "${variant//,/ }" ); do sets+=(--set "$kv"); done
    name=$preset.$(echo "$variant" | tr -c 'a-zA-Z0-9_.=\n' '_' | cut -c1-60)
    python3 -m u2moe bench train --config "$preset" --ds-config "$ds" --train-shards "$data/train/shards.list" \
      --units "$data/units" --cmvn "$data/cmvn.json" "${sets[@]}" --profile "${PROFILE:-5}" \
      --json "$out/$name.json" > "$out/$name.log" 2>&1 || echo "$name failed (see $out/$name.log)"
    python3 - "$out/$name.json" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))
keys = ("loader_audio_s_per_s", "loader_first_batch_s", "loader_epoch_start_wait_s",
        "step_audio_s_per_s", "step_ms_median", "step_tflops", "step_mfu",
        "batch_frames_mean", "gpu_busy_frac", "kernels_per_step", "profile_wall_ms_per_step")
print(sys.argv[1].rsplit("/", 1)[-1], " ".join(f"{k}={r[k]:.3g}" for k in keys if k in r),
      "syncs", sum(r.get("syncs_per_step", {}).values()), r.get("syncs_per_step"))
PY
  done
done
