"""Parameter accounting: total, per component, experts, and active per frame."""
from __future__ import annotations

import torch

from ..configs.model import ModelConfig
from .asr_model import U2Model


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_parameters(model: U2Model) -> dict[str, int]:
    """`active_per_frame` counts what one frame (or decoder token) passes through: every dense
    weight, the routers, and top_k of each MoE's num_experts experts."""
    total = _numel(model)
    experts = routers = active_experts = 0
    for _, moe in model.moe_layers():
        layer_experts = _numel(moe.experts)
        experts += layer_experts
        routers += _numel(moe.router)
        active_experts += layer_experts * moe.top_k // moe.num_experts
    return {
        "total": total,
        "active_per_frame": total - experts + active_experts,
        "encoder": _numel(model.encoder),
        "decoder": _numel(model.decoder),
        "ctc": _numel(model.ctc),
        "experts": experts,
        "routers": routers,
    }


def count_config_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Counts without allocating: the model is built on the meta device."""
    with torch.device("meta"):
        return count_parameters(U2Model(cfg))
