"""Operators one training step dispatches, by phase (forward, backward, clipping, optimizer step),
counted on the CPU: a host-bound GPU step pays a launch for about each.

The step is `Trainer.train_step` as `u2moe train` builds it, on a batch of the given shards after
two warm-up steps. Views and allocations, which launch nothing, are left out. The backward phase
includes moving the compute weights' gradients (trainer/compute_weights.py). On the CPU the
optimizer phase is torch's per-parameter AdamW; on a GPU it is one fused kernel.

    python -m u2moe.bench.step_op_count --config small_dense --ds-config ds_configs/zero0_bf16.json \\
        --train-shards D/train/shards.list --units D/units --cmvn D/cmvn.json [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from torch.utils._python_dispatch import TorchDispatchMode

from ..trainer.distributed import distributed
from ..trainer.train import Trainer, TrainPaths
from ..trainer.vocab_size import load_training_config
from .train_step import measure_loader

NO_LAUNCH = {"view", "_unsafe_view", "t", "transpose", "expand", "detach", "unsqueeze", "squeeze", "slice",
             "select", "as_strided", "permute", "alias", "empty", "empty_strided", "_reshape_alias", "split",
             "split_with_sizes", "unbind", "chunk", "narrow"}


class PhaseCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in NO_LAUNCH:
            self.counts[self.phase] += 1
        return func(*args, **(kwargs or {}))

    def entering(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """fn, switching the count to `phase` when called."""
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.phase = phase
            return fn(*args, **kwargs)
        return wrapped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--config", "--ds-config", "--train-shards", "--units", "--cmvn"):
        p.add_argument(flag, required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    cfg = load_training_config(args.config, args.set, args.units)
    with distributed() as info, tempfile.TemporaryDirectory() as exp_dir:
        paths = TrainPaths(args.train_shards, args.train_shards, args.units, args.cmvn, Path(exp_dir), args.ds_config)
        trainer = Trainer(cfg, paths, info)
        _, batches = measure_loader(trainer, 3, 1)
        trainer.engine.train()
        for batch in batches[:2]:
            trainer.train_step(batch)
        counter = PhaseCounter()
        engine = trainer.engine
        engine.backward = counter.entering("backward", engine.backward)
        engine.step = counter.entering("step", engine.step)
        if trainer.clipper is not None:
            trainer.clipper = counter.entering("clip", trainer.clipper)
        with counter:
            trainer.train_step(batches[2])
        counts = dict(counter.counts)
        print(json.dumps({"config": args.config, "ds_config": Path(args.ds_config).name, **counts,
                          "forward+backward": counts["forward"] + counts["backward"]}))


if __name__ == "__main__":
    main()
