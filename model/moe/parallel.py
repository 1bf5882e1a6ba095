"""Expert parallelism under DeepSpeed: sharding, ZeRO-1/2 integration, checkpoint layouts.

The canonical checkpoint is the full (EP=1) state dict: every `experts.{w1,b1,w2,b2}` holds all
E experts stacked on dim 0. Rank r of an expert-parallel group of size P holds rows
[r*E/P, (r+1)*E/P) of each; `shard_expert_state_dict` / `merge_expert_state_dicts` convert.

DeepSpeed's ZeRO-1/2 reduces a parameter over the expert-data-parallel group, and counts it once
per expert-parallel group in the global gradient norm, when (a) the parameter is marked as an MoE
parameter (`allreduce = False`, `group_name`, see deepspeed/moe/utils.py `is_moe_param`), (b) it
sits in an optimizer param group with `moe: True` (`moe_optimizer_param_groups`), and (c) the
engine's `has_moe_layers` is set. DeepSpeedEngine sets (c) only for modules that are instances of
its own `deepspeed.moe.layer.MoE` (engine.py, `_configure_distributed_model`). Rather than patch
the engine, `enable_expert_parallel` registers a parameter-less `_DeepSpeedMoEMarker`, a subclass
of that class, in each of our MoE layers.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .layer import MoEFeedForward

_EXPERT_KEY = re.compile(r"(^|\.)experts\.(w1|b1|w2|b2)$")


def is_expert_key(key: str) -> bool:
    return _EXPERT_KEY.search(key) is not None


def shard_expert_state_dict(full_sd: Mapping[str, torch.Tensor], ep_rank: int,
                            ep_size: int) -> dict[str, torch.Tensor]:
    """The state dict rank `ep_rank` of `ep_size` holds: expert tensors sliced, the rest as is."""
    out = {}
    for key, value in full_sd.items():
        if is_expert_key(key):
            if value.size(0) % ep_size:
                raise ValueError(f"{key}: {value.size(0)} experts do not split over {ep_size} ranks")
            value = value.chunk(ep_size)[ep_rank].clone()
        out[key] = value
    return out


def merge_expert_state_dicts(shards: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The full state dict from the local ones of ranks 0..P-1 (non-expert entries from rank 0)."""
    return {key: torch.cat([sd[key] for sd in shards]) if is_expert_key(key) else value
            for key, value in shards[0].items()}


def gather_expert_state_dict(local_sd: Mapping[str, torch.Tensor],
                             group: dist.ProcessGroup) -> dict[str, torch.Tensor]:
    """Collective over the expert-parallel group: every rank gets the full state dict."""
    out = {}
    for key, value in local_sd.items():
        if is_expert_key(key):
            parts = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, value.contiguous(), group=group)
            value = torch.cat(parts)
        out[key] = value
    return out


@functools.cache
def _marker_class() -> type:
    # Built on first use: importing deepspeed is slow and the model must not need it.
    from deepspeed.moe.layer import MoE

    class _DeepSpeedMoEMarker(MoE):
        """Seen by DeepSpeedEngine as a native MoE layer; holds no parameters.

        num_local_experts = 0 makes the engine's per-expert checkpoint files (whose key layout is
        that of DeepSpeed's own experts) empty on save and skipped on load; our expert tensors
        travel in the ZeRO optimizer shards and in the trainer's full model.pt.
        """

        def __init__(self, num_experts: int, ep_size: int, group_name: str) -> None:
            nn.Module.__init__(self)  # not MoE.__init__: it would build DeepSpeed's experts
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.expert_group_name = group_name
            self.num_local_experts = 0

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # groups were made by enable_expert_parallel, before the engine existed

        def forward(self, *args, **kwargs):
            raise RuntimeError("a marker for DeepSpeed, not a layer")

    return _DeepSpeedMoEMarker


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def enable_expert_parallel(model: nn.Module, ep_size: int) -> str:
    """Split every MoE layer's experts over DeepSpeed's expert-parallel groups of `ep_size` ranks.

    Call after `deepspeed.init_distributed()` and before `deepspeed.initialize`, on a model that
    holds all experts (e.g. loaded from a full checkpoint). Returns the DeepSpeed group name.
    """
    from deepspeed.utils import groups

    group_name = f"ep_size_{ep_size}"
    if group_name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep_group = groups._get_expert_parallel_group(group_name)
    for layer in moe_layers(model):
        if ep_size > 1:
            layer.shard_experts(ep_group)
        for param in layer.experts.parameters():
            param.allreduce = False
            param.group_name = group_name
        layer.deepspeed_moe_marker = _marker_class()(layer.num_experts, ep_size, group_name)
    return group_name


def moe_optimizer_param_groups(model: nn.Module, weight_decay: float,
                               no_decay: Iterable[str] = ("bias", "norm", "pos_bias")
                               ) -> list[dict]:
    """Optimizer param groups for DeepSpeed: decay / no-decay, each split into shared and expert
    groups (`moe: True`, named by the expert group) as ZeRO-1/2 expects.

    Parameters whose name contains a `no_decay` fragment, and 1-D tensors, get no weight decay.
    Works with or without `enable_expert_parallel` (without it there are no expert groups).
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, plain = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.dim() <= 1 or any(f in name for f in no_decay)
        # Stacked expert biases are 2-D ([E, h]) but are biases all the same.
        skip = skip or re.search(r"experts\.b[12]$", name) is not None
        (plain if skip else decay).append(param)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": plain, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return split_params_into_different_moe_groups_for_optimizer(groups)
