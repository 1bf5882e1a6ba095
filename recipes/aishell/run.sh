#!/usr/bin/env bash
# AISHELL-1 (178 h Mandarin, openslr 33), character units, u2moe moe_1b on 8 x 24 GB GPUs.
#
#   bash recipes/aishell/run.sh --aishell-root /data/data_aishell [--stage 0 --stop-stage 6]
#
# Stages: 0 Kaldi dirs (local/aishell_data_prep.py), 1 shards, 2 units (characters), 3 CMVN,
# 4 train (launch/train.sh: DeepSpeed, every GPU of this node), 5 average + export, 6 decode.
# 8 x 24 GB: moe_1b, ZeRO-2 bf16, the 8 experts of each layer spread over the 8 GPUs
# (train.expert_parallel_size=8). Options: --name value for any variable below (--help).
set -euo pipefail

stage=0
stop_stage=6
aishell_root=            # the data_aishell directory: wav/{train,dev,test}/SPK/*.wav, transcript/
data=data/aishell        # Kaldi dirs, shards, units, CMVN (relative to the current directory)
exp=exp/aishell_moe_1b
config=moe_1b
ds_config=              # default: ds_configs/zero2_bf16.json of this repository
gpus=                   # default: every GPU of this node (2 CPU processes without one)
expert_parallel_size=8
train_opts=""           # extra `u2moe train` arguments, e.g. "--set optim.lr=5e-4 --max-steps 1000"
average_num=5           # at most the presets' train.keep_checkpoints (5)
decode_modes=ctc_greedy,ctc_prefix_beam,attention,attention_rescoring
test_sets="test"
nj=8
utts_per_shard=1000     # utterances per shard: training needs at least one shard per GPU
cmvn_max_utts=          # empty: every training utterance
dry_run=false           # true: print the commands of the stages instead of running them

. "$(dirname "$0")/../parse_options.sh"
. "$(dirname "$0")/../common.sh"
ds_config=${ds_config:-$repo_dir/ds_configs/zero2_bf16.json}
here=$(cd "$(dirname "$0")" && pwd)

if stage_on 0; then
  [ -n "$aishell_root" ] || { echo "$0: give --aishell-root /path/to/data_aishell" >&2; exit 1; }
  run python3 "$here/local/aishell_data_prep.py" "$aishell_root" "$data"
fi
prep_stages char ""
model_stages
