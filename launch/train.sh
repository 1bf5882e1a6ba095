#!/usr/bin/env bash
# Single node, every GPU of it (or N CPU processes where there is none), through the deepspeed
# launcher. Everything after the options goes to `u2moe train`.
#
#   launch/train.sh [--gpus N] [--port P] -- --config moe_1b --ds-config ds_configs/zero2_bf16.json \
#       --train-shards data/train/shards.list --dev-shards data/dev/shards.list \
#       --units data/units --cmvn data/cmvn.json --exp-dir exp/moe_1b --set train.expert_parallel_size=8
#
# The interpreter is u2moe's (launch/find_python.sh): no environment needs to be activated.
set -euo pipefail
repo_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$repo_dir/launch/find_python.sh"
gpus=""
port=${MASTER_PORT:-29500}
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) gpus=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [ -z "$gpus" ]; then
  gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
  [ "$gpus" -gt 0 ] || gpus=2  # no GPU: two CPU processes (gloo)
fi
# The launcher's module rather than a `deepspeed` script on PATH, which may be another
# environment's (or missing where an install has no scripts); it starts the ranks with the same
# interpreter.
exec "$python" -m deepspeed.launcher.runner --num_gpus "$gpus" --master_port "$port" --no_local_rank --module u2moe train "$@"
