#!/usr/bin/env bash
# The GPU runs recorded in docs/moe.md: the GPU tests (`-m gpu`: expert backends, compute
# weights, decoding), then `u2moe bench moe` (all paths, kernel profile), `u2moe bench moe-ep`
# (expert parallelism over the machine's GPUs, when it has 2 or more) and `u2moe bench moe-infer`,
# logs under $1.
# Run from the repository root with u2moe importable (installed, or on PYTHONPATH).
set -o pipefail
out=${1:-.}
repo=$PWD
nvidia-smi -L
(cd /tmp && python3 -m pytest -q -p no:cacheprovider -m gpu "$repo/tests") 2>&1 | tee "$out/gpu_tests.log"
(cd /tmp && python3 -m u2moe bench moe --profile --out "$out/bench_moe.json") 2>&1 | tee "$out/bench_moe.log"
(cd /tmp && python3 -m u2moe bench moe-infer --out "$out/bench_moe_infer.json") 2>&1 | tee "$out/bench_moe_infer.log"
gpus=$(nvidia-smi -L | wc -l)
if [ "$gpus" -ge 2 ]; then
  (cd /tmp && python3 -m torch.distributed.run --nproc_per_node "$gpus" -m u2moe bench moe-ep \
    --out "$out/bench_moe_ep.json") 2>&1 | tee "$out/bench_moe_ep.log"
fi
