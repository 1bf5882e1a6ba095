"""Conformer encoder: CMVN -> Conv2d subsampling -> relative-position Conformer blocks."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..configs.model import EncoderConfig
from .cmvn import GlobalCMVN
from .embedding import RelPositionalEncoding
from .encoder_layer import ConformerEncoderLayer
from .mask import attention_mask, choose_chunk, make_non_pad_mask
from .moe.layer import MoEFeedForward, stack_real_frames, static_shapes
from .subsampling import Conv2dSubsampling


class ConformerEncoder(nn.Module):
    # Never saved or scripted: see `set_layer_runner` and `moe_ffns`.
    __jit_ignored_attributes__ = ["layer_runner", "moe_ffns"]

    def __init__(self, cfg: EncoderConfig, cmvn: GlobalCMVN | None = None):
        super().__init__()
        self.cfg = cfg
        # Always present so that checkpoints have one layout; identity statistics until set.
        self.global_cmvn = cmvn or GlobalCMVN(torch.zeros(cfg.input_size), torch.ones(cfg.input_size))
        self.embed = Conv2dSubsampling(cfg.input_size, cfg.output_size, cfg.subsampling, cfg.subsampling_channels)
        self.pos_enc = RelPositionalEncoding(cfg.output_size, cfg.positional_dropout_rate)
        self.encoders = nn.ModuleList(ConformerEncoderLayer(cfg) for _ in range(cfg.num_blocks))
        self.after_norm = nn.LayerNorm(cfg.output_size)
        # A view of the blocks' MoE layers (not a registration), which share one mask per forward.
        self.moe_ffns = [m for m in self.encoders.modules() if isinstance(m, MoEFeedForward)]
        self.layer_runner: Callable[..., torch.Tensor] | None = None

    def set_layer_runner(self, runner: Callable[..., torch.Tensor] | None) -> None:
        """In training, call `runner` in place of `run_layers` (with the same arguments): how the
        trainer replays the blocks as CUDA graphs (trainer/cuda_graphs.py). None: run_layers."""
        self.layer_runner = runner

    def output_size(self) -> int:
        return self.cfg.output_size

    @torch.jit.unused  # TorchScript export (inference/export) scripts forward_chunk only
    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor, decoding_chunk_size: int = 0,
                num_decoding_left_chunks: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """xs [B, T, F] fbank; returns encoder output [B, T', D] and valid frames [B, T'].

        In training the chunk size follows the config (dynamic or static chunks); at inference
        `decoding_chunk_size` > 0 gives the chunk-masked forward that streaming reproduces.
        """
        xs = self.embed(self.global_cmvn(xs))
        lens = self.embed.output_lengths(xs_lens)
        valid = make_non_pad_mask(lens, xs.size(1))
        xs, pos_emb = self.pos_enc(xs)
        cfg = self.cfg
        chunk, left = choose_chunk(
            xs.size(1), use_dynamic_chunk=cfg.use_dynamic_chunk,
            use_dynamic_left_chunk=cfg.use_dynamic_left_chunk, max_chunk_size=cfg.max_chunk_size,
            full_context_prob=cfg.full_context_prob, static_chunk_size=cfg.static_chunk_size,
            decoding_chunk_size=decoding_chunk_size, num_decoding_left_chunks=num_decoding_left_chunks,
            training=self.training,
        )
        mask = attention_mask(valid, chunk, left)
        run = self.layer_runner if self.layer_runner is not None and self.training else self.run_layers
        return self.after_norm(run(xs, mask, pos_emb, valid)), valid

    @torch.jit.unused
    def run_layers(self, xs: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor,
                   valid: torch.Tensor) -> torch.Tensor:
        """The Conformer blocks of a full-utterance forward (what `layer_runner` replaces)."""
        recompute = self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        real_frames = stack_real_frames(self.moe_ffns, valid)
        for layer in self.encoders:
            if recompute:
                # Dropout and router noise replay identically (checkpoint restores the RNG);
                # MoE all-to-alls rerun in the same order on every rank.
                xs, _, _ = checkpoint(layer, xs, mask, pos_emb, valid, None, None, real_frames, use_reentrant=False)
            else:
                xs, _, _ = layer(xs, mask, pos_emb, valid, real_frames=real_frames)
        return xs

    def forward_chunk(self, xs: torch.Tensor, att_cache: torch.Tensor, cnn_cache: torch.Tensor,
                      required_cache_size: int, key_valid: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One streaming step: the fbank window of a chunk -> its encoder frames and new caches.

        xs [B, W, F] must start on a subsampling boundary and hold the chunk's right context;
        att_cache [L, B, H, Tc, 2*d_k] and cnn_cache [L, B, C, kernel-1] come from the previous
        step (size 0 in any dimension at the start, as WeNet's runtime passes them).
        required_cache_size: key frames to keep for the next step (< 0: all, as with unlimited
        left chunks). key_valid [B, Tc + T'] marks real cached and current frames when a batch
        holds utterances of different lengths; None means all are real.
        Returns out [B, T', D], att_cache [L, B, H, kept, 2*d_k], cnn_cache [L, B, C, kernel-1].
        """
        cached = att_cache.size(3) if att_cache.dim() == 5 and att_cache.size(0) > 0 else 0
        xs, pos_emb = self._embed_chunk(xs, cached)
        if key_valid is None:
            key_valid = torch.ones(xs.size(0), cached + xs.size(1), dtype=torch.bool, device=xs.device)
        mask = key_valid.unsqueeze(1).expand(-1, xs.size(1), -1)
        valid = key_valid[:, cached:]
        keep_from = 0 if required_cache_size < 0 else max(cached + xs.size(1) - required_cache_size, 0)
        new_att: list[torch.Tensor] = []
        new_cnn: list[torch.Tensor] = []
        real_frames: torch.Tensor | None = None
        if not torch.jit.is_scripting():  # scripted MoE layers route every frame
            real_frames = stack_real_frames(self.moe_ffns, valid)
        for i, layer in enumerate(self.encoders):
            layer_att = att_cache[i] if cached > 0 else None
            layer_cnn = cnn_cache[i] if cnn_cache.dim() == 4 and cnn_cache.size(0) > 0 else None
            xs, att, cnn = layer(xs, mask, pos_emb, valid, layer_att, layer_cnn, real_frames)
            new_att.append(att[:, :, keep_from:])
            new_cnn.append(cnn)
        return self.after_norm(xs), torch.stack(new_att), torch.stack(new_cnn)

    @torch.jit.unused
    def forward_chunk_in_place(self, xs: torch.Tensor, chunk_valid: torch.Tensor, att_cache: torch.Tensor,
                               cnn_cache: torch.Tensor, cache_valid: torch.Tensor) -> torch.Tensor:
        """forward_chunk with fixed shapes and no host reads, for a batch of streams that a CUDA
        graph can replay: the caches are preallocated buffers of a bounded left context, read and
        then overwritten in place, and masks stand for what is not there.

        xs [B, W, F] as forward_chunk's; chunk_valid [B, T'] real frames of this chunk (False
        past a stream's end); att_cache [L, B, H, Tc, 2*d_k], cnn_cache [L, B, C, kernel-1] and
        cache_valid [B, Tc] (False: a slot not yet filled, or a frame past a stream's end) hold
        the last Tc key frames, the latest last. Masked keys get zero attention weight, and
        relative positions count from the latest frame, so a partly filled cache gives what
        forward_chunk gives with the shorter cache it stands for. Returns out [B, T', D]; the
        buffers then hold the cache for the next chunk.
        """
        cached = att_cache.size(3)
        xs, pos_emb = self._embed_chunk(xs, cached)
        key_valid = torch.cat([cache_valid, chunk_valid], dim=1)
        mask = key_valid.unsqueeze(1).expand(-1, xs.size(1), -1)
        with static_shapes(self.moe_ffns):  # padding removal would read its size on the host
            for i, layer in enumerate(self.encoders):
                xs, att, cnn = layer(xs, mask, pos_emb, chunk_valid, att_cache[i], cnn_cache[i])
                # att is a new tensor (the cache joined to this chunk's keys): overwriting the
                # buffer it was made from is safe.
                att_cache[i].copy_(att[:, :, att.size(2) - cached:])
                cnn_cache[i].copy_(cnn)
        cache_valid.copy_(key_valid[:, key_valid.size(1) - cached:])
        return self.after_norm(xs)

    def _embed_chunk(self, xs: torch.Tensor, cached: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's fbank window -> its scaled frames and the relative positions of its
        queries over `cached` earlier key frames and its own."""
        xs = self.embed(self.global_cmvn(xs))
        return self.pos_enc(xs, cached + xs.size(1))
