#!/usr/bin/env bash
# synth-en (3.2 h synthetic English, the shared development corpus), BPE units, u2moe moe_1b on
# 8 x 24 GB GPUs. The corpus is already in Kaldi form (<split>/wav.scp, text, utt2spk), so stage 0
# only checks it.
#
#   bash recipes/synth_en/run.sh [--corpus /work/shared/corpora/synth-en] [--stage 0 --stop-stage 6]
#
# Stages: 0 check the corpus (its Kaldi dirs are read in place), 1 shards, 2 units (sentencepiece BPE),
# 3 CMVN, 4 train (launch/train.sh: DeepSpeed, every GPU of this node), 5 average + export,
# 6 decode. 8 x 24 GB: moe_1b, ZeRO-2 bf16, the 8 experts of each layer spread over the 8 GPUs
# (train.expert_parallel_size=8); for a CPU try: --config tiny_moe --ds-config
# ds_configs/zero2_fp32.json --expert-parallel-size 2; on one GPU, a small model with CUDA graphs
# (docs/training.md): --config small_moe --vocab-size 256 --gpus 1 --expert-parallel-size 1 --ds-config
# ds_configs/zero0_pure_bf16.json --train-opts "--set data.batch.type=bucket --set train.cuda_graphs=true".
# Options: --name value (--help).
set -euo pipefail

stage=0
stop_stage=6
corpus=                 # default: $U2MOE_SHARED/corpora/synth-en, else <repo>/../shared/corpora/synth-en
data=data/synth_en
exp=exp/synth_en_moe_1b
config=moe_1b
ds_config=              # default: ds_configs/zero2_bf16.json of this repository
gpus=                   # default: every GPU of this node (2 CPU processes without one)
expert_parallel_size=8
vocab_size=5000
train_opts=""           # extra `u2moe train` arguments, e.g. "--set optim.lr=5e-4 --max-steps 1000"
average_num=5           # at most the presets' train.keep_checkpoints (5)
decode_modes=ctc_greedy,ctc_prefix_beam,attention,attention_rescoring
test_sets="test"
nj=8
utts_per_shard=100      # utterances per shard: training needs at least one shard per GPU (4000 -> 40 shards)
cmvn_max_utts=
dry_run=false           # true: print the commands of the stages instead of running them

. "$(dirname "$0")/../parse_options.sh"
. "$(dirname "$0")/../common.sh"
ds_config=${ds_config:-$repo_dir/ds_configs/zero2_bf16.json}
corpus=${corpus:-${U2MOE_SHARED:-$repo_dir/../shared}/corpora/synth-en}
# wav.scp paths are relative to the corpus root: read the Kaldi dirs where they are.
kaldi=$corpus

if stage_on 0; then
  for set in train dev test; do
    for f in wav.scp text utt2spk; do
      [ -f "$corpus/$set/$f" ] || { echo "$0: $corpus/$set/$f missing (give --corpus)" >&2; exit 1; }
    done
  done
fi
prep_stages bpe "$vocab_size"
model_stages
