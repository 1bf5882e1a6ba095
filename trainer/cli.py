"""Trainer subcommands: `u2moe train` and `u2moe export`."""
from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

from .distributed import cap_gpu_memory, distributed
from .export import export_model
from .run_log import RunLog
from .train import TrainPaths, run_training
from .vocab_size import load_training_config
from .watchdog import process_group_timeout


def _train(args: argparse.Namespace) -> int:
    paths = TrainPaths(args.train_shards, args.dev_shards, args.units, args.cmvn, Path(args.exp_dir),
                       args.ds_config, args.init_model)
    # Before any process group: missing inputs and bad keys fail fast.
    paths.check()
    cfg = load_training_config(args.config, args.set, args.units)
    with distributed(process_group_timeout(cfg.train.watchdog_seconds)) as info:
        handlers: list[logging.Handler] = [logging.StreamHandler()]
        run_log = RunLog() if info.is_main else None
        if run_log is not None:
            handlers.append(run_log)
        logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                            format=f"%(asctime)s [rank {info.rank}] %(message)s", handlers=handlers)
        cap_gpu_memory(info.device, args.max_gpu_memory_gb)
        run_training(cfg, paths, info, args.max_steps, args.max_minutes, run_log)
    return 0


def _export(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path(args.exp_dir) / "model.pt"
    used = export_model(Path(args.exp_dir), out, args.average, args.tag, args.val_best)
    print(f"wrote {out} from {', '.join(used)}")
    return 0


def positive(convert: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: `convert`ed, and refused unless > 0 (a limit of 0 or -5 steps or minutes
    would end the run before it starts, and exit 0 as if it had trained)."""
    def parse(text: str) -> float:
        value = convert(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def add_model_and_data_arguments(p: argparse.ArgumentParser) -> None:
    """What builds a trainer: shared by `u2moe train` and `u2moe bench train`."""
    p.add_argument("--config", required=True, help="preset name or experiment yaml")
    p.add_argument("--ds-config", required=True, help="DeepSpeed JSON (ds_configs/)")
    p.add_argument("--train-shards", required=True, help="shards.list of the training set")
    p.add_argument("--units", required=True,
                   help="units directory (u2moe prep units), which gives model.vocab_size unless you set it")
    p.add_argument("--cmvn", required=True, help="global CMVN JSON (u2moe prep cmvn)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. optim.lr=5e-4 (repeatable)")
    p.add_argument("--max-gpu-memory-gb", type=positive(float), default=None,
                   help="cap each process's GPU memory at this many GiB (e.g. 24 to try a consumer-card recipe)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train with DeepSpeed (under deepspeed, torchrun, srun, or alone)")
    add_model_and_data_arguments(p)
    p.add_argument("--dev-shards", required=True, help="shards.list of the dev set")
    p.add_argument("--exp-dir", required=True, help="run directory: config, checkpoints, TensorBoard")
    p.add_argument("--max-steps", type=positive(int), default=None, help="stop after this many optimizer steps")
    p.add_argument("--max-minutes", type=positive(float), default=None,
                   help="stop (and checkpoint) after this many minutes of training in this invocation, "
                        "evaluation and checkpoints excluded")
    p.add_argument("--init-model", default=None, help="warm start from an exported model.pt")
    p.set_defaults(handler=_train)

    p = sub.add_parser("export", help="consolidate checkpoints into one fp32 model.pt")
    p.add_argument("--exp-dir", default=".", help="run directory of `u2moe train` (its checkpoints/)")
    p.add_argument("--out", default=None, help="model file to write (default: EXP_DIR/model.pt)")
    p.add_argument("--average", type=positive(int), default=1, help="average the last N checkpoints")
    p.add_argument("--val-best", action="store_true",
                   help="average the N of lowest dev loss instead of the last N (WeNet's --val_best)")
    p.add_argument("--tag", default=None, help="export (or end the average at) this checkpoint, e.g. step_00005000")
    p.set_defaults(handler=_export)
