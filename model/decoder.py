"""Attention decoders: a left-to-right Transformer decoder, and U2++'s bidirectional pair."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..configs.model import DecoderConfig
from .attention import additive_mask
from .autocast import compute_dtype
from .decoder_layer import DecoderLayer
from .embedding import PositionalEncoding
from .mask import make_non_pad_mask, subsequent_mask
from .moe.layer import MoEFeedForward, stack_real_frames


class TransformerDecoder(nn.Module):
    # Never saved or scripted: see `set_layer_runner` and `moe_ffns`.
    __jit_ignored_attributes__ = ["layer_runner", "moe_ffns"]

    def __init__(self, vocab_size: int, dim: int, num_blocks: int, cfg: DecoderConfig):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos_enc = PositionalEncoding(dim, cfg.positional_dropout_rate)
        self.decoders = nn.ModuleList(DecoderLayer(dim, cfg) for _ in range(num_blocks))
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.after_norm = nn.LayerNorm(dim)
        self.output_layer = nn.Linear(dim, vocab_size)
        # A view of the blocks' MoE layers (not a registration), which share one mask per forward.
        self.moe_ffns = [m for m in self.decoders.modules() if isinstance(m, MoEFeedForward)]
        self.layer_runner: Callable[..., torch.Tensor] | None = None

    def set_layer_runner(self, runner: Callable[..., torch.Tensor] | None) -> None:
        """In training, call `runner` in place of `run_layers` (with the same arguments): how the
        trainer replays the blocks as CUDA graphs (trainer/cuda_graphs.py). None: run_layers."""
        self.layer_runner = runner

    def forward(self, memory: torch.Tensor | None, memory_valid: torch.Tensor, ys_in: torch.Tensor,
                ys_in_lens: torch.Tensor, memory_kv: list[torch.Tensor] | None = None) -> torch.Tensor:
        """memory [B, T, D], memory_valid [B, T], ys_in [B, L] (<sos> + tokens) -> logits [B, L, V].
        memory_kv: each layer's cross-attention keys and values of the memory (`project_memory`),
        given instead of memory: rescoring projects an utterance's memory once for all of its
        hypotheses, not once per hypothesis."""
        tgt_valid = make_non_pad_mask(ys_in_lens, ys_in.size(1))
        tgt_mask = tgt_valid.unsqueeze(1) & subsequent_mask(ys_in.size(1), ys_in.device).unsqueeze(0)
        x = self.pos_enc(self.embed(ys_in))
        # Every layer attends under the same two masks: made additive once, for all of them, in
        # the dtype attention runs in (autocast's, else the input's; scripted: no autocast).
        dtype = x.dtype if torch.jit.is_scripting() else compute_dtype(x)
        tgt_mask = additive_mask(tgt_mask, dtype)
        memory_mask = additive_mask(memory_valid.unsqueeze(1), dtype)
        if not torch.jit.is_scripting():
            if self.layer_runner is not None and self.training and memory_kv is None:
                x = self.layer_runner(x, tgt_mask, memory, memory_mask, tgt_valid)
                return self.output_layer(self.after_norm(x))
        x = self.run_layers(x, tgt_mask, memory, memory_mask, tgt_valid, memory_kv)
        return self.output_layer(self.after_norm(x))

    def run_layers(self, x: torch.Tensor, tgt_mask: torch.Tensor, memory: torch.Tensor | None,
                   memory_mask: torch.Tensor, tgt_valid: torch.Tensor,
                   memory_kv: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The decoder blocks under additive masks (what `layer_runner` replaces)."""
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        real_frames: torch.Tensor | None = None
        if not torch.jit.is_scripting():  # scripted MoE layers route every frame
            real_frames = stack_real_frames(self.moe_ffns, tgt_valid)
        for i, layer in enumerate(self.decoders):
            layer_kv: torch.Tensor | None = None
            if memory_kv is not None:
                layer_kv = memory_kv[i]
            if recompute and not torch.jit.is_scripting():
                x = self._checkpointed(i, x, tgt_mask, memory, memory_mask, tgt_valid, layer_kv, real_frames)
            else:
                x = layer(x, tgt_mask, memory, memory_mask, tgt_valid, layer_kv, real_frames)
        return x

    @torch.jit.export  # the runtime module's forward_attention_decoder projects through it
    def project_memory(self, memory: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's cross-attention keys and values of memory [B, T, D], for `forward_step`
        and `forward`'s memory_kv."""
        projected: list[torch.Tensor] = []
        for layer in self.decoders:
            projected.append(layer.src_attn.project_key_value(memory))
        return projected

    @torch.jit.unused
    def forward_step(self, token: torch.Tensor, position: int, caches: list[torch.Tensor | None],
                     memory_kv: list[torch.Tensor], memory_valid: torch.Tensor
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One step of incremental decoding: token [B] at `position` (0 for <sos>), caches from
        the previous step (None per layer at the first), memory_kv from `project_memory` ->
        (logits [B, V] of the next unit, caches with this position). Per step the cost is one
        position through every layer plus attention over the earlier ones, where `forward`
        on the growing prefix redoes every position: quadratic against linear in the length."""
        x = self.pos_enc(self.embed(token.unsqueeze(1)), position)
        memory_mask = memory_valid.unsqueeze(1)
        new_caches = []
        for layer, cache, kv in zip(self.decoders, caches, memory_kv):
            x, cache = layer.forward_step(x, cache, kv, memory_mask)
            new_caches.append(cache)
        return self.output_layer(self.after_norm(x))[:, 0], new_caches

    @torch.jit.unused  # the exported runtime never trains
    def _checkpointed(self, i: int, x: torch.Tensor, tgt_mask: torch.Tensor, memory: torch.Tensor | None,
                      memory_mask: torch.Tensor, tgt_valid: torch.Tensor, memory_kv: torch.Tensor | None,
                      real_frames: torch.Tensor | None) -> torch.Tensor:
        return checkpoint(self.decoders[i], x, tgt_mask, memory, memory_mask, tgt_valid, memory_kv, real_frames,
                          use_reentrant=False)


class BiTransformerDecoder(nn.Module):
    """Left-to-right and right-to-left decoders over the same encoder output (U2++).

    The right-to-left decoder is trained on reversed targets; at rescoring time both score each
    hypothesis, giving the future context a left-to-right decoder cannot see.
    """

    def __init__(self, vocab_size: int, dim: int, cfg: DecoderConfig):
        super().__init__()
        self.left_decoder = TransformerDecoder(vocab_size, dim, cfg.num_blocks, cfg)
        self.right_decoder = (
            TransformerDecoder(vocab_size, dim, cfg.r_num_blocks, cfg) if cfg.r_num_blocks > 0 else None
        )

    def layers(self) -> list[nn.Module]:
        """Every decoder layer, left-to-right then right-to-left."""
        right = list(self.right_decoder.decoders) if self.right_decoder is not None else []
        return [*self.left_decoder.decoders, *right]

    def forward(self, memory: torch.Tensor, memory_valid: torch.Tensor, ys_in: torch.Tensor,
                ys_in_lens: torch.Tensor, r_ys_in: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        left = self.left_decoder(memory, memory_valid, ys_in, ys_in_lens)
        right = None
        if r_ys_in is not None and self.right_decoder is not None:
            right = self.right_decoder(memory, memory_valid, r_ys_in, ys_in_lens)
        return left, right
