"""Checkpoints: DeepSpeed's (model, optimizer, scheduler) plus our consolidated fp32 weights.

A checkpoint directory `EXP/checkpoints/step_XXXXXXXX/` holds DeepSpeed's files, which resume a
run at the same world size, and `fp32_ep{r}.pt`, written by expert-parallel rank r of the first
expert-parallel group: the full-precision weights of its experts (and, on rank 0, of every
non-expert parameter). Those files are all that `u2moe export` needs, at any expert-parallel size
and ZeRO stage; DeepSpeed's own zero_to_fp32 cannot consolidate MoE checkpoints.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from u2moe.dataconf import ConfigError
from u2moe.model.moe.parallel import is_expert_key, merge_expert_state_dicts

TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def list_tags(ckpt_root: Path) -> list[str]:
    """Complete checkpoints, oldest first (a tag without its fp32 files was interrupted)."""
    if not ckpt_root.is_dir():
        return []
    tags = [p.name for p in ckpt_root.iterdir() if TAG_RE.match(p.name) and (p / "fp32_ep0.pt").is_file()]
    return sorted(tags)


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


def save_checkpoint(engine: Any, ckpt_root: Path, step: int, client_state: dict[str, Any],
                    expert_parallel_size: int, keep: int) -> Path:
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state)
    _remove_deepspeed_scripts(ckpt_root)
    weights = full_fp32_params(engine)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank < expert_parallel_size:
        part = {n: w for n, w in weights.items() if rank == 0 or is_expert_key(n)}
        if rank == 0:
            # Persistent buffers (the CMVN statistics) complete the model's state.
            part.update({n: b.detach().float().cpu() for n, b in engine.module.state_dict().items()
                         if n not in weights})
        torch.save({"expert_parallel_size": expert_parallel_size, "ep_rank": rank, "params": part},
                   ckpt_root / tag / f"fp32_ep{rank}.pt")
    # Each rank's random streams (dropout, chunk sizes) so that a resumed run repeats the
    # uninterrupted one instead of merely resembling it.
    torch.save(_rng_state(), ckpt_root / tag / f"rng_rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        for old in list_tags(ckpt_root)[:-keep]:
            shutil.rmtree(ckpt_root / old, ignore_errors=True)
    return ckpt_root / tag


def _remove_deepspeed_scripts(ckpt_root: Path) -> None:
    """DeepSpeed copies its zero_to_fp32.py and zero_to_torch.py beside the checkpoints it saves;
    they cannot consolidate ours (expert slices, see above), `u2moe export` does."""
    for name in ("zero_to_fp32.py", "zero_to_torch.py"):
        (ckpt_root / name).unlink(missing_ok=True)


def load_latest(engine: Any, ckpt_root: Path, expert_parallel_size: int) -> dict[str, Any] | None:
    """Resume from the newest complete checkpoint; None when there is none."""
    tags = list_tags(ckpt_root)
    if not tags:
        return None
    tag_dir = ckpt_root / tags[-1]
    saved_ep = torch.load(tag_dir / "fp32_ep0.pt", map_location="cpu", weights_only=True)["expert_parallel_size"]
    if saved_ep != expert_parallel_size:
        raise ConfigError(f"{tag_dir}: written with expert_parallel_size {saved_ep}; resume with the same, "
                          "or export it and start a new run with --init-model")
    _, client_state = engine.load_checkpoint(str(ckpt_root), tag=tags[-1])
    if client_state is None:
        raise RuntimeError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    rank = dist.get_rank() if dist.is_initialized() else 0
    _restore_local_experts(engine, tag_dir, expert_parallel_size, rank)
    rng_file = tag_dir / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def _restore_local_experts(engine: Any, tag_dir: Path, expert_parallel_size: int, rank: int) -> None:
    """Put this rank's own experts back into the module.

    DeepSpeed loads every rank's module from rank 0's file, so an expert-parallel rank other than
    0 would start from rank 0's experts (ZeRO's fp32 master copy is right, but the module it
    computes with is not refreshed from it). Our fp32 files hold each expert-parallel rank's slice.
    """
    if expert_parallel_size == 1:
        return
    # DeepSpeed's expert-parallel groups are runs of consecutive ranks.
    part = torch.load(tag_dir / f"fp32_ep{rank % expert_parallel_size}.pt", map_location="cpu",
                      weights_only=True)["params"]
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
    first = torch.load(tag_dir / "fp32_ep0.pt", map_location="cpu", weights_only=True)
    parts = [first] + [torch.load(tag_dir / f"fp32_ep{r}.pt", map_location="cpu", weights_only=True)
                       for r in range(1, first["expert_parallel_size"])]
    return merge_expert_state_dicts([p["params"] for p in parts])
