"""The MoE feed-forward block, a drop-in replacement for `PositionwiseFeedForward`."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from ...configs.model import FeedForwardConfig
from .all_to_all_dispatcher import AllToAllTimer, AllToAllTokenDispatcher
from .backends import ExpertGroups
from .dispatcher import SortedTokenDispatcher
from .experts import GroupedExperts
from .router import TopKRouter


class MoEFeedForward(nn.Module):
    # Training-side bookkeeping, not part of a scripted model: once a forward has run, the
    # property's ExpertGroups has no TorchScript type and scripting the model would fail.
    __jit_unused_properties__ = ["last_tokens_per_expert"]

    def __init__(self, dim: int, cfg: FeedForwardConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.router = TopKRouter(dim, cfg.num_experts, cfg.top_k, cfg.router_noise_std,
                                 cfg.aux_loss_weight)
        self.dispatcher: SortedTokenDispatcher | AllToAllTokenDispatcher = \
            SortedTokenDispatcher(cfg.num_experts)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.hidden_units, cfg.activation,
                                      cfg.dropout_rate)
        # Set by every forward: where this rank's frames went (read by the trainer through
        # `last_tokens_per_expert`), and the weighted balancing loss (None unless enabled).
        self._routed_groups: ExpertGroups | None = None
        self.aux_loss: torch.Tensor | None = None
        self.static_shapes = False  # see use_static_shapes

    def use_static_shapes(self, enabled: bool = True) -> None:
        """Keep padded frames in the batch, skipped by the experts (sorted after every expert's
        rows, output zero), instead of removing them first: no data-dependent shapes and no host
        read (`nonzero`), which a CUDA graph cannot hold. The same outputs and gradients."""
        self.static_shapes = enabled

    @property
    def last_tokens_per_expert(self) -> torch.Tensor | None:
        """[E] frames of this rank routed to each (global) expert in the last forward; counted
        when asked, not in every forward. None under `static_shapes`."""
        # Under CUDA graphs these would be the groups of whichever shape was captured last.
        if self._routed_groups is None or self.static_shapes:
            return None
        return self._routed_groups.counts.detach()

    def shard_experts(self, group: dist.ProcessGroup) -> None:
        """Expert parallelism over `group`: keep this rank's E/P contiguous experts and exchange
        frames with the other ranks. The router stays whole (every rank routes its own frames)."""
        ep_size, ep_rank = dist.get_world_size(group), dist.get_rank(group)
        if self.num_experts % ep_size:
            raise ValueError(f"{self.num_experts} experts do not split over {ep_size} ranks")
        local = self.num_experts // ep_size
        self.experts.shard(ep_rank * local, local)
        self.dispatcher = AllToAllTokenDispatcher(self.num_experts, group)

    def time_exchanges(self, timer: AllToAllTimer) -> None:
        """Under expert parallelism, time this layer's all-to-alls on `timer`."""
        if isinstance(self.dispatcher, AllToAllTokenDispatcher):
            self.dispatcher.timer = timer

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None,
                real_frames: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D]; valid [B, T] (True = real frame). Padded frames get exactly zero output.
        real_frames: `real_frame_positions(valid)` when the caller has it (`stack_real_frames`)."""
        if torch.jit.is_scripting() or self.experts.backend == "export":
            return self._forward_inference(x, valid)
        if self.experts.decodes_packed(x):
            return self._forward_packed(x, valid, real_frames)
        return self._forward_dispatch(x, valid, real_frames)

    def _forward_inference(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """Inference for the exporters, TorchScript (scripted) and ONNX (traced by torch.export):
        the training path's routing and arithmetic, each expert on its own frames only
        (GroupedExperts.forward_sparse), without the autograd nodes and host-side group sizes
        that neither can hold. Sets neither the routed groups nor `aux_loss`."""
        flat = x.reshape(-1, x.size(-1))
        index = real_frame_positions(valid)
        tokens = _real_frames(flat, index)
        y = self.experts.forward_sparse(tokens, *self.router.select(tokens))
        return _to_all_frames(y, flat, index).view_as(x)

    @torch.jit.unused
    def _forward_packed(self, x: torch.Tensor, valid: torch.Tensor | None,
                        real_frames: torch.Tensor | None) -> torch.Tensor:
        """Decoding on a CPU (GroupedExperts.forward_packed): the real frames routed as in eval
        mode, through the experts' packed weights. Sets neither the routed groups nor `aux_loss`;
        padding is removed whether or not static shapes were asked for (no CUDA graph here)."""
        flat = x.reshape(-1, x.size(-1))
        index = real_frames if real_frames is not None else real_frame_positions(valid)
        tokens = _real_frames(flat, index)
        y = self.experts.forward_packed(tokens, *self.router.select(tokens))
        return _to_all_frames(y, flat, index).view_as(x)

    @torch.jit.unused
    # Eager under train.compile: the group sizes and the padding removal are data-dependent, and
    # the expert FFN is already one fused autograd node; traced, they only break the graph and
    # recompile per layer, past dynamo's recompile limit.
    @torch.compiler.disable
    def _forward_dispatch(self, x: torch.Tensor, valid: torch.Tensor | None,
                          real_frames: torch.Tensor | None) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))
        index = None
        if not self.static_shapes:
            index = real_frames if real_frames is not None else real_frame_positions(valid)
        skip = ~valid.reshape(-1) if self.static_shapes and valid is not None else None
        tokens = _real_frames(flat, index)
        routing = self.router(tokens, skip)
        permuted, groups, state = self.dispatcher.dispatch(tokens, routing)
        y = self.dispatcher.combine(self.experts(permuted, groups), state)
        self._routed_groups = state.groups
        self.aux_loss = routing.aux_loss
        return _to_all_frames(y, flat, index).view_as(x)


@contextmanager
def static_shapes(layers: list[MoEFeedForward]) -> Iterator[None]:
    """Within the block, every one of `layers` runs with static shapes (`use_static_shapes`);
    each gets its own setting back afterwards."""
    before = [layer.static_shapes for layer in layers]
    for layer in layers:
        layer.use_static_shapes()
    try:
        yield
    finally:
        for layer, enabled in zip(layers, before):
            layer.use_static_shapes(enabled)


def real_frame_positions(valid: torch.Tensor | None) -> torch.Tensor | None:
    """Row indices of the frames `valid` [B, T] marks real, in the flattened [B*T] frames (None
    when there is no mask). Padding is removed before routing: it costs no expert compute and
    skews no load."""
    return None if valid is None else valid.reshape(-1).nonzero().squeeze(1)


def stack_real_frames(layers: list[MoEFeedForward], valid: torch.Tensor | None) -> torch.Tensor | None:
    """real_frame_positions(valid) for a stack whose MoE `layers` all see the same mask, found
    once for all of them (`nonzero` reads its count back to the host, a synchronisation); None
    where no layer removes padding (none, or static shapes)."""
    if valid is None or all(layer.static_shapes for layer in layers):
        return None
    return real_frame_positions(valid)


def _real_frames(flat: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """The rows of flat [N, D] at `index` (all of them when None)."""
    return flat if index is None else flat.index_select(0, index)


def _to_all_frames(y: torch.Tensor, flat: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """The real frames' outputs y back at their rows of an [N, D] of flat's shape, in y's dtype
    (autocast's, as without a mask); padded rows zero."""
    if index is None:
        return y
    return y.new_zeros(flat.shape).index_copy(0, index, y)
