#!/usr/bin/env bash
# Several nodes over ssh, with a DeepSpeed hostfile (see launch/hostfile.example); run it on the
# first node. Everything after `--` goes to `u2moe train`; paths must be valid on every node.
#
#   launch/multinode.sh launch/hostfile -- --config moe_1b --ds-config ds_configs/zero2_bf16.json ...
set -euo pipefail
hostfile=$1; shift
[ "${1:-}" = "--" ] && shift
# The `deepspeed` script, or its module where an install has no scripts (pip --target).
launcher=(deepspeed)
command -v deepspeed > /dev/null || launcher=("${PYTHON:-python3}" -m deepspeed.launcher.runner)
exec "${launcher[@]}" --hostfile "$hostfile" --master_addr "$(hostname)" --master_port "${MASTER_PORT:-29500}" \
  --no_local_rank --module u2moe train "$@"
