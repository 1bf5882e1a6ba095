"""The U2++ model: Conformer encoder, CTC head and bidirectional attention decoder, jointly trained."""
from __future__ import annotations

import torch
from torch import nn

from ..configs.model import ModelConfig
from .cmvn import GlobalCMVN
from .ctc import CTC
from .decoder import BiTransformerDecoder, TransformerDecoder
from .encoder import ConformerEncoder
from .label_smoothing import LabelSmoothingLoss
from .moe import MoEFeedForward
from .moe.all_to_all_dispatcher import AllToAllTimer
from .targets import add_sos_eos, reverse_padded


class U2Model(nn.Module):
    def __init__(self, cfg: ModelConfig, cmvn: GlobalCMVN | None = None):
        super().__init__()
        self.cfg = cfg
        self.sos = self.eos = cfg.vocab_size - 1
        self.encoder = ConformerEncoder(cfg.encoder, cmvn)
        dim = cfg.encoder.output_size
        self.decoder = BiTransformerDecoder(cfg.vocab_size, dim, cfg.decoder)
        self.ctc = CTC(cfg.vocab_size, dim)
        self.criterion_att = LabelSmoothingLoss(cfg.vocab_size, cfg.lsm_weight, cfg.length_normalized_loss)
        # A plain list (not a ModuleList): a view of submodules, not a second registration.
        self._moe_layers = [(n, m) for n, m in self.named_modules() if isinstance(m, MoEFeedForward)]

    def moe_layers(self) -> list[tuple[str, MoEFeedForward]]:
        return self._moe_layers

    def layer_stacks(self) -> list[tuple[ConformerEncoder | TransformerDecoder, nn.ModuleList]]:
        """The encoder's and each decoder's block stack, with the module that runs it (whose
        `set_layer_runner` replaces how it runs in training)."""
        stacks: list[tuple[ConformerEncoder | TransformerDecoder, nn.ModuleList]] = [
            (self.encoder, self.encoder.encoders)]
        for decoder in (self.decoder.left_decoder, self.decoder.right_decoder):
            if decoder is not None:
                stacks.append((decoder, decoder.decoders))
        return stacks

    def use_static_shapes(self, enabled: bool = True) -> None:
        """Every MoE layer keeps padded frames in place, skipped (MoEFeedForward.use_static_shapes):
        fixed shapes and no host reads, for CUDA graph capture."""
        for _, layer in self._moe_layers:
            layer.use_static_shapes(enabled)

    def time_expert_exchanges(self) -> AllToAllTimer:
        """A timer of every expert-parallel all-to-all this model runs from now on."""
        timer = AllToAllTimer()
        for _, layer in self._moe_layers:
            layer.time_exchanges(timer)
        return timer

    def forward(self, feats: torch.Tensor, feats_lengths: torch.Tensor, target: torch.Tensor,
                target_lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """Joint loss, U2++ style; each term is returned for logging.

        loss = ctc_weight * ctc + (1 - ctc_weight) * ((1 - reverse_weight) * l2r + reverse_weight * r2l)
        (+ the routers' balancing losses when enabled).
        """
        memory, valid = self.encoder(feats, feats_lengths)
        return self.losses(memory, valid, target, target_lengths)

    def losses(self, memory: torch.Tensor, valid: torch.Tensor, target: torch.Tensor,
               target_lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms given the encoder output (evaluation also decodes from the same output)."""
        cfg = self.cfg
        out: dict[str, torch.Tensor] = {}
        memory_lens = valid.sum(dim=1)
        loss_ctc = self.ctc(memory, memory_lens, target, target_lengths)
        ys_in, ys_out = add_sos_eos(target, target_lengths, self.sos, self.eos)
        r_ys_in = r_ys_out = None
        if cfg.reverse_weight > 0:
            r_ys_in, r_ys_out = add_sos_eos(reverse_padded(target, target_lengths), target_lengths,
                                            self.sos, self.eos)
        l2r, r2l = self.decoder(memory, valid, ys_in, target_lengths + 1, r_ys_in)
        loss_l2r = self.criterion_att(l2r, ys_out)
        loss_att = loss_l2r
        if r2l is not None:
            loss_r2l = self.criterion_att(r2l, r_ys_out)
            loss_att = (1 - cfg.reverse_weight) * loss_l2r + cfg.reverse_weight * loss_r2l
            out["loss_r2l"] = loss_r2l.detach()
        loss = cfg.ctc_weight * loss_ctc + (1 - cfg.ctc_weight) * loss_att
        aux = [m.aux_loss for _, m in self.moe_layers() if m.aux_loss is not None]
        if aux:
            out["loss_moe_aux"] = torch.stack(aux).sum()
            loss = loss + out["loss_moe_aux"]
            out["loss_moe_aux"] = out["loss_moe_aux"].detach()
        out.update(loss=loss, loss_ctc=loss_ctc.detach(), loss_att=loss_att.detach(),
                   loss_l2r=loss_l2r.detach())
        return out
