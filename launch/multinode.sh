#!/usr/bin/env bash
# Several nodes over ssh, with a DeepSpeed hostfile (see launch/hostfile.example); run it on the
# first node. Everything after `--` goes to `u2moe train`; paths must be valid on every node.
#
#   launch/multinode.sh launch/hostfile -- --config moe_1b --ds-config ds_configs/zero2_bf16.json ...
# The interpreter is u2moe's (launch/find_python.sh); the other nodes run the same path.
set -euo pipefail
repo_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$repo_dir/launch/find_python.sh"
hostfile=$1; shift
[ "${1:-}" = "--" ] && shift
exec "$python" -m deepspeed.launcher.runner --hostfile "$hostfile" --master_addr "$(hostname)" --master_port "${MASTER_PORT:-29500}" \
  --no_local_rank --module u2moe train "$@"
