"""Training step time of several trainer variants, interleaved on one device: e.g. bf16 autocast
(`zero0_bf16.json`) against whole-model bf16 (`zero0_pure_bf16.json`), or either with CUDA
graphs (`train.cuda_graphs=true`).

A variant is NAME=DS_CONFIG[:KEY=VALUE,...]: a DeepSpeed config and config overrides of its
own, on top of the shared --set ones. One trainer per variant, built as `u2moe train` builds it,
all stepping on the same in-memory batches (read with the first variant's data settings). Each
variant first steps once over every batch (every shape seen: kernels chosen, graphs captured),
then the variants take turns, in alternating order, for `--rounds` rounds of `--steps` steps: on
a shared host whose speed drifts within minutes, only alternation compares like with like. Prints each variant's per-round medians and their median.

    python -m u2moe.bench.step_ab --config small_dense --variant autocast=ds_configs/zero0_bf16.json \\
        --variant graphs=ds_configs/zero0_pure_bf16.json:train.cuda_graphs=true \\
        --train-shards D/train/shards.list --units D/units --cmvn D/cmvn.json \\
        --set model.vocab_size=256 --set data.device_features=true --set data.batch.type=bucket
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from ..trainer.distributed import distributed
from ..trainer.train import Trainer, TrainPaths
from ..trainer.vocab_size import load_training_config
from .train_step import measure_loader, measure_steps


def _variant(text: str) -> tuple[str, str, list[str]]:
    name, sep, rest = text.partition("=")
    if not sep or not rest:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=DS_CONFIG[:KEY=VALUE,...]")
    ds_config, _, sets = rest.partition(":")
    return name, ds_config, [s for s in sets.split(",") if s]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--config", "--train-shards", "--units", "--cmvn"):
        p.add_argument(flag, required=True)
    p.add_argument("--variant", type=_variant, action="append", required=True,
                   help="NAME=DS_CONFIG[:KEY=VALUE,...] (repeat)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--loader-batches", type=int, default=40)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()

    with distributed() as info, tempfile.TemporaryDirectory() as exp_dir:
        trainers = {name: Trainer(load_training_config(args.config, [*args.set, *sets], args.units),
                                  TrainPaths(args.train_shards, args.train_shards, args.units, args.cmvn,
                                             Path(exp_dir) / name, ds_config), info)
                    for name, ds_config, sets in args.variant}
        _, batches = measure_loader(next(iter(trainers.values())), args.loader_batches, 1)
        for trainer in trainers.values():
            measure_steps(trainer, batches, len(batches))
        medians: dict[str, list[float]] = {name: [] for name in trainers}
        for round_ in range(args.rounds):
            order = list(trainers.items())
            for name, trainer in order if round_ % 2 == 0 else order[::-1]:
                medians[name].append(round(measure_steps(trainer, batches, args.steps)["step_ms_median"], 1))
        print(json.dumps({"config": args.config, "batches": len(batches), "steps_per_round": args.steps,
                          "variants": {name: [ds, sets] for name, ds, sets in args.variant},
                          "step_ms_median_per_round": medians,
                          "step_ms_median_of_rounds": {k: statistics.median(v) for k, v in medians.items()}}))


if __name__ == "__main__":
    main()
