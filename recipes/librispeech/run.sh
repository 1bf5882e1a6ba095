#!/usr/bin/env bash
# LibriSpeech (960 h English, openslr 12), BPE 5000 units, u2moe moe_1b on 8 x 24 GB GPUs.
#
#   bash recipes/librispeech/run.sh --librispeech-root /data/LibriSpeech [--stage 0 --stop-stage 6]
#
# Stages: 0 Kaldi dirs (local/librispeech_data_prep.py: train = the train parts merged, dev =
# the dev parts merged, one dir per test part), 1 shards, 2 units (sentencepiece BPE 5000),
# 3 CMVN, 4 train (launch/train.sh: DeepSpeed, every GPU of this node), 5 average + export,
# 6 decode. 8 x 24 GB: moe_1b, ZeRO-2 bf16, the 8 experts of each layer spread over the 8 GPUs
# (train.expert_parallel_size=8). Options: --name value for any variable below (--help).
set -euo pipefail

stage=0
stop_stage=6
librispeech_root=        # the LibriSpeech directory: PART/SPK/CHAPTER/*.flac + *.trans.txt
train_parts="train-clean-100 train-clean-360 train-other-500"
dev_parts="dev-clean dev-other"
test_parts="test-clean test-other"
data=data/librispeech
exp=exp/librispeech_moe_1b
config=moe_1b
ds_config=              # default: ds_configs/zero2_bf16.json of this repository
gpus=                   # default: every GPU of this node (2 CPU processes without one)
expert_parallel_size=8
vocab_size=5000
train_opts=""           # extra `u2moe train` arguments, e.g. "--set optim.lr=5e-4 --max-steps 1000"
average_num=5           # at most the presets' train.keep_checkpoints (5)
decode_modes=ctc_greedy,ctc_prefix_beam,attention,attention_rescoring
nj=8
utts_per_shard=1000     # utterances per shard: training needs at least one shard per GPU
cmvn_max_utts=20000     # empty: every training utterance
dry_run=false           # true: print the commands of the stages instead of running them

. "$(dirname "$0")/../parse_options.sh"
# Kaldi-style names for the test dirs: test-clean -> test_clean.
test_sets=$(echo "$test_parts" | tr '-' '_')
. "$(dirname "$0")/../common.sh"
ds_config=${ds_config:-$repo_dir/ds_configs/zero2_bf16.json}
here=$(cd "$(dirname "$0")" && pwd)

if stage_on 0; then
  [ -n "$librispeech_root" ] || { echo "$0: give --librispeech-root /path/to/LibriSpeech" >&2; exit 1; }
  # shellcheck disable=SC2086
  run python3 "$here/local/librispeech_data_prep.py" "$data/train" "$librispeech_root" $train_parts
  # shellcheck disable=SC2086
  run python3 "$here/local/librispeech_data_prep.py" "$data/dev" "$librispeech_root" $dev_parts
  for part in $test_parts; do
    run python3 "$here/local/librispeech_data_prep.py" "$data/$(echo "$part" | tr '-' '_')" "$librispeech_root" "$part"
  done
fi
prep_stages bpe "$vocab_size"
model_stages
