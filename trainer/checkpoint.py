"""Checkpoints: DeepSpeed's (model, optimizer, scheduler) plus our consolidated fp32 weights.

A checkpoint directory `EXP/checkpoints/step_XXXXXXXX/` holds DeepSpeed's files, which resume a
run at the same world size, and `fp32_ep{r}.pt`, written by expert-parallel rank r of the first
expert-parallel group: the full-precision weights of its experts (and, on rank 0, of every
non-expert parameter). Those files are all that `u2moe export` needs, at any expert-parallel size
and ZeRO stage; DeepSpeed's own zero_to_fp32 cannot consolidate MoE checkpoints.

A checkpoint exists once its `manifest.json` does: written by rank 0 after every rank has written
and synced its files (trainer/checkpoint_files.py), it names each file with its size and holds
the run's config. A directory without it, or whose files differ from it, was interrupted (a rank
killed mid-write): resume and export pass over it and say so.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..configs.loading import ConfigError
from ..model.moe.parallel import is_expert_key, merge_expert_state_dicts
from .checkpoint_files import CheckpointFiles, allowed_classes, load_data, write_atomic

TAG_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"

logger = logging.getLogger("u2moe.checkpoint")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def scan_tags(ckpt_root: Path) -> tuple[list[str], dict[str, str]]:
    """(complete checkpoints oldest first, {incomplete checkpoint: what it lacks})."""
    complete: list[str] = []
    incomplete: dict[str, str] = {}
    if not ckpt_root.is_dir():
        return complete, incomplete
    for tag in sorted(p.name for p in ckpt_root.iterdir() if TAG_RE.match(p.name) and p.is_dir()):
        lack = _lack(ckpt_root / tag)
        if lack is None:
            complete.append(tag)
        else:
            incomplete[tag] = lack
    return complete, incomplete


def list_tags(ckpt_root: Path) -> list[str]:
    """Complete checkpoints, oldest first."""
    return scan_tags(ckpt_root)[0]


def usable_tags(ckpt_root: Path, announce: bool = True) -> list[str]:
    """Complete checkpoints, oldest first; `announce`: log one line naming the incomplete ones."""
    complete, incomplete = scan_tags(ckpt_root)
    if incomplete and announce:
        logger.warning("passing over incomplete checkpoints in %s: %s", ckpt_root,
                       ", ".join(f"{tag} ({lack})" for tag, lack in incomplete.items()))
    return complete


def _lack(tag_dir: Path) -> str | None:
    """What makes a checkpoint incomplete, None when nothing does."""
    try:
        files = read_manifest(tag_dir)["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {MANIFEST}"
    for name, size in files.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not {size}"
    return None


def read_manifest(tag_dir: Path) -> dict[str, Any]:
    return json.loads((tag_dir / MANIFEST).read_text())


def full_fp32_params(engine: Any) -> dict[str, torch.Tensor]:
    """Every local parameter in fp32, from the optimizer's master copy where there is one.

    Collective: under ZeRO the master weights are partitioned, so every rank must call it.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in engine.module.named_parameters():
        value = safe_get_full_fp32_param(param)
        out[name] = (value if value is not None else param.detach().float()).cpu()
    return out


def checkpoint_files(engine: Any) -> CheckpointFiles:
    """The engine's checkpoint engine, made to write atomically and read without running code."""
    if not isinstance(engine.checkpoint_engine, CheckpointFiles):
        engine.checkpoint_engine = CheckpointFiles(engine.checkpoint_engine)
    return engine.checkpoint_engine


def save_checkpoint(engine: Any, ckpt_root: Path, step: int, client_state: dict[str, Any],
                    config: dict[str, Any], keep: int) -> Path:
    """Every rank writes its files, then rank 0 the manifest naming them all. `config`: the
    run's config as a dict, kept in the manifest to refuse a resume with a different model."""
    tag = tag_for(step)
    tag_dir = ckpt_root / tag
    rank = dist.get_rank() if dist.is_initialized() else 0
    files = checkpoint_files(engine)
    if rank == 0 and tag_dir.exists():  # left by an interrupted save of this step
        shutil.rmtree(tag_dir)
    if dist.is_initialized():
        dist.barrier()
    files.written.clear()
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state)
    _remove_deepspeed_scripts(ckpt_root)
    written = {os.path.relpath(path, tag_dir): size for path, size in files.written.items()}
    weights = full_fp32_params(engine)
    expert_parallel_size = config["train"]["expert_parallel_size"]
    if rank < expert_parallel_size:
        part = {n: w for n, w in weights.items() if rank == 0 or is_expert_key(n)}
        if rank == 0:
            # Persistent buffers (the CMVN statistics) complete the model's state.
            part.update({n: b.detach().float().cpu() for n, b in engine.module.state_dict().items()
                         if n not in weights})
        blob = {"expert_parallel_size": expert_parallel_size, "ep_rank": rank, "params": part}
        name = f"fp32_ep{rank}.pt"
        written[name] = write_atomic(tag_dir / name, lambda tmp: torch.save(blob, tmp))
    # Each rank's random streams (dropout, chunk sizes) so that a resumed run repeats the
    # uninterrupted one instead of merely resembling it.
    name = f"rng_rank{rank}.pt"
    written[name] = write_atomic(tag_dir / name, lambda tmp: torch.save(_rng_state(), tmp))
    every_rank = [written]
    if dist.is_initialized() and dist.get_world_size() > 1:
        every_rank = [None] * dist.get_world_size()
        dist.all_gather_object(every_rank, written)
    if rank == 0:
        manifest = {"files": {n: s for files_of_rank in every_rank for n, s in sorted(files_of_rank.items())},
                    "config": config}
        write_atomic(tag_dir / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
        complete, incomplete = scan_tags(ckpt_root)
        # Incomplete checkpoints older than this one can never be resumed from.
        for old in complete[:-keep] + [t for t in incomplete if t < tag]:
            shutil.rmtree(ckpt_root / old, ignore_errors=True)
    return tag_dir


def _remove_deepspeed_scripts(ckpt_root: Path) -> None:
    """DeepSpeed copies its zero_to_fp32.py and zero_to_torch.py beside the checkpoints it saves;
    they cannot consolidate ours (expert slices, see above), `u2moe export` does."""
    for name in ("zero_to_fp32.py", "zero_to_torch.py"):
        (ckpt_root / name).unlink(missing_ok=True)


def load_latest(engine: Any, ckpt_root: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """Resume from the newest complete checkpoint; None when there is none. `config`: this run's,
    as a dict; a checkpoint of another model or expert-parallel size is refused."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tags = usable_tags(ckpt_root, announce=rank == 0)
    if not tags:
        return None
    tag_dir = ckpt_root / tags[-1]
    manifest = read_manifest(tag_dir)
    refuse_other_config(tag_dir, manifest["config"], config)
    # Every rank checks every file before any rank loads one: all refuse together.
    for name in manifest["files"]:
        allowed_classes(tag_dir / name)
    checkpoint_files(engine)
    _, client_state = engine.load_checkpoint(str(ckpt_root), tag=tags[-1])
    if client_state is None:
        raise RuntimeError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    expert_parallel_size = config["train"]["expert_parallel_size"]
    _restore_local_experts(engine, tag_dir, expert_parallel_size, rank)
    _set_rng_state(load_data(tag_dir / f"rng_rank{rank}.pt"))
    return client_state


def refuse_other_config(tag_dir: Path, saved: dict[str, Any], config: dict[str, Any]) -> None:
    """A checkpoint resumes only the model and expert-parallel size that wrote it."""
    # Through JSON, as the manifest went: tuples become lists there.
    config = json.loads(json.dumps(config))
    changed = _differences(saved["model"], config["model"], "model")
    if changed:
        raise ConfigError(f"{tag_dir}: written by another model ({'; '.join(changed)}); resume with the same "
                          "model config, or start a new --exp-dir (--init-model to warm start from an export)")
    saved_ep, ep = saved["train"]["expert_parallel_size"], config["train"]["expert_parallel_size"]
    if saved_ep != ep:
        raise ConfigError(f"{tag_dir}: written with train.expert_parallel_size {saved_ep}, not {ep}; resume with "
                          "the same, or export it and start a new run with --init-model")


def _differences(saved: Any, now: Any, key: str) -> list[str]:
    """'key: saved -> now' for each leaf that differs."""
    if isinstance(saved, dict) and isinstance(now, dict):
        return [line for k in sorted(saved.keys() | now.keys())
                for line in _differences(saved.get(k), now.get(k), f"{key}.{k}")]
    return [] if saved == now else [f"{key}: {saved!r} -> {now!r}"]


def _restore_local_experts(engine: Any, tag_dir: Path, expert_parallel_size: int, rank: int) -> None:
    """Put this rank's own experts back into the module.

    DeepSpeed loads every rank's module from rank 0's file, so an expert-parallel rank other than
    0 would start from rank 0's experts (ZeRO's fp32 master copy is right, but the module it
    computes with is not refreshed from it). Our fp32 files hold each expert-parallel rank's slice.
    """
    if expert_parallel_size == 1:
        return
    # DeepSpeed's expert-parallel groups are runs of consecutive ranks.
    part = load_data(tag_dir / f"fp32_ep{rank % expert_parallel_size}.pt")["params"]
    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            if is_expert_key(name):
                param.copy_(part[name])


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_fp32_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The full model's fp32 state from one checkpoint, expert slices concatenated in rank order."""
    first = load_data(tag_dir / "fp32_ep0.pt")
    parts = [first] + [load_data(tag_dir / f"fp32_ep{r}.pt") for r in range(1, first["expert_parallel_size"])]
    return merge_expert_state_dicts([p["params"] for p in parts])
