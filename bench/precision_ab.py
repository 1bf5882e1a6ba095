"""Training step time under several DeepSpeed configs, interleaved on one device: e.g. bf16
autocast (`zero0_bf16.json`) against the trainer's whole-model bf16 (`zero0_pure_bf16.json`).

One trainer per config, built as `u2moe train` builds it, all stepping on the same in-memory
batches. Each config first steps once over every batch (every padded shape seen, kernels
chosen), then the configs take turns, in alternating order, for `--rounds` rounds of `--steps`
steps: on a shared host whose speed drifts by 10-20% within minutes (docs/RESULTS.md), only
alternation compares like with like. Prints each config's per-round medians and their median.

    python bench/precision_ab.py --config small_dense --ds-configs ds_configs/zero0_bf16.json \\
        ds_configs/zero0_pure_bf16.json --train-shards D/train/shards.list --units D/units \\
        --cmvn D/cmvn.json --set model.vocab_size=256 --set data.device_features=true
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--config", "--train-shards", "--units", "--cmvn"):
        p.add_argument(flag, required=True)
    p.add_argument("--ds-configs", nargs="+", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--loader-batches", type=int, default=40)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    from u2moe.config import load_config
    from u2moe.trainer.bench import measure_loader, measure_steps
    from u2moe.trainer.distributed import distributed
    from u2moe.trainer.train import Trainer, TrainPaths

    cfg = load_config(args.config, args.set)
    with distributed() as info, tempfile.TemporaryDirectory() as exp_dir:
        trainers = {Path(ds).name: Trainer(cfg, TrainPaths(args.train_shards, args.train_shards, args.units,
                                                          args.cmvn, Path(exp_dir) / Path(ds).stem, ds), info)
                    for ds in args.ds_configs}
        _, batches = measure_loader(next(iter(trainers.values())), args.loader_batches)
        for trainer in trainers.values():
            measure_steps(trainer, batches, len(batches))
        medians: dict[str, list[float]] = {name: [] for name in trainers}
        for round_ in range(args.rounds):
            order = list(trainers.items())
            for name, trainer in order if round_ % 2 == 0 else order[::-1]:
                medians[name].append(round(measure_steps(trainer, batches, args.steps)["step_ms_median"], 1))
        print(json.dumps({"config": args.config, "batches": len(batches), "steps_per_round": args.steps,
                          "step_ms_median_per_round": medians,
                          "step_ms_median_of_rounds": {k: statistics.median(v) for k, v in medians.items()}}))


if __name__ == "__main__":
    main()
