"""TorchScript export with the entry points of WeNet's C++ runtime (`torch::jit::load`).

WeNet's runtime (runtime/core/decoder/torch_asr_model.cc) loads a scripted ASRModel and calls
these methods; `RuntimeModule` provides them with WeNet's signatures and tensor layouts
(wenet/transformer/asr_model.py, wenet/bin/export_jit.py):

| method | returns |
|---|---|
| `forward_encoder_chunk(xs, offset, required_cache_size, att_cache, cnn_cache)` | (out [1, T', D], att_cache [L, H, Tc, 2*d_k], cnn_cache [L, 1, D, kernel-1]) |
| `ctc_activation(xs)` | CTC log posteriors [1, T', V] |
| `forward_attention_decoder(hyps, hyps_lens, encoder_out, reverse_weight)` | (l2r, r2l) log-softmax [N, L, V] |
| `subsampling_rate()`, `right_context()`, `sos_symbol()`, `eos_symbol()` | int |
| `is_bidirectional_decoder()` | bool |

Deviations from WeNet, all invisible to its runtime:
- `offset` is accepted and ignored: the encoder's positions are relative (the encodings of a
  chunk do not depend on where it sits), so no absolute frame offset is needed.
- The module is a wrapper around the trained model's submodules (encoder, CTC head, the two
  decoders), not the training module itself: `forward` is the full-context encoder plus CTC
  (what offline decoding starts from), not the training loss.
- MoE layers run their exporters' path (`MoEFeedForward._forward_inference`): the training
  path's routing and arithmetic, each expert on its own frames only.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ...model.asr_model import U2Model
from ...model.moe import MoEFeedForward


@contextlib.contextmanager
def use_export_experts(model: nn.Module) -> Iterator[None]:
    """Within the block every MoE layer of `model` takes its exporters' path, which tracing
    exporters (ONNX) need (TorchScript takes it by itself); the old backends come back after."""

    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    saved = [m.experts.backend for m in layers]
    for m in layers:
        m.experts.backend = "export"
    try:
        yield
    finally:
        for m, backend in zip(layers, saved):
            m.experts.backend = backend


class RuntimeModule(nn.Module):
    """The scriptable runtime view of a trained `U2Model` (shares its weights)."""

    def __init__(self, model: U2Model):
        super().__init__()
        self.encoder = model.encoder
        self.ctc = model.ctc
        self.left_decoder = model.decoder.left_decoder
        self.right_decoder = model.decoder.right_decoder
        self.sos = int(model.sos)
        self.eos = int(model.eos)
        self.subsampling = int(model.encoder.embed.subsampling_rate)
        self.context = int(model.encoder.embed.right_context)
        self.bidirectional = model.decoder.right_decoder is not None

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        """Full-context CTC log posteriors [1, T', V] of one utterance's fbank xs [1, T, F]."""
        out, _, _ = self.encoder.forward_chunk(xs, torch.zeros(0, 0, 0, 0, 0), torch.zeros(0, 0, 0, 0), -1)
        return self.ctc.log_softmax(out)

    @torch.jit.export
    def subsampling_rate(self) -> int:
        return self.subsampling

    @torch.jit.export
    def right_context(self) -> int:
        return self.context

    @torch.jit.export
    def sos_symbol(self) -> int:
        return self.sos

    @torch.jit.export
    def eos_symbol(self) -> int:
        return self.eos

    @torch.jit.export
    def is_bidirectional_decoder(self) -> bool:
        return self.bidirectional

    @torch.jit.export
    def forward_encoder_chunk(self, xs: torch.Tensor, offset: int, required_cache_size: int,
                              att_cache: torch.Tensor = torch.zeros(0, 0, 0, 0),
                              cnn_cache: torch.Tensor = torch.zeros(0, 0, 0, 0)
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One chunk of one stream, WeNet's layout: xs [1, W, F] with W = (chunk-1)*rate +
        right_context + 1 fbank frames; att_cache [L, H, Tc, 2*d_k] and cnn_cache
        [L, 1, D, kernel-1] from the previous call ([0, 0, 0, 0] at the start);
        required_cache_size: key frames to keep (chunk * left_chunks; < 0 all). `offset` is
        unused (relative positions)."""
        assert xs.size(0) == 1, "forward_encoder_chunk takes one stream"
        out, att, cnn = self.encoder.forward_chunk(xs, att_cache.unsqueeze(1), cnn_cache,
                                                   required_cache_size)
        return out, att.squeeze(1), cnn

    @torch.jit.export
    def ctc_activation(self, xs: torch.Tensor) -> torch.Tensor:
        return self.ctc.log_softmax(xs)

    @torch.jit.export
    def forward_attention_decoder(self, hyps: torch.Tensor, hyps_lens: torch.Tensor,
                                  encoder_out: torch.Tensor, reverse_weight: float = 0.0
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """hyps [N, L]: <sos> + tokens, padded (any value); hyps_lens [N] counting <sos>;
        encoder_out [1, T, D]. Returns the left-to-right and right-to-left decoders' log
        softmax [N, L, V]; the right-to-left input is <sos> + reversed tokens, padded with
        <eos>, as in training. Without a right decoder or with reverse_weight <= 0 the second
        output is a 0-dim zero (as in WeNet)."""
        assert encoder_out.size(0) == 1
        num = hyps.size(0)
        memory_valid = torch.ones(num, encoder_out.size(1), dtype=torch.bool, device=encoder_out.device)
        # Each decoder layer projects encoder_out once; its keys and values serve every hypothesis.
        score = F.log_softmax(self.left_decoder(None, memory_valid, hyps, hyps_lens,
                                                self.left_decoder.project_memory(encoder_out)).float(), dim=-1)
        r_score = torch.zeros((), device=score.device)
        if self.right_decoder is not None and reverse_weight > 0:
            r_hyps = reverse_hyps(hyps, hyps_lens, self.eos)
            r_logits = self.right_decoder(None, memory_valid, r_hyps, hyps_lens,
                                          self.right_decoder.project_memory(encoder_out))
            r_score = F.log_softmax(r_logits.float(), dim=-1)
        return score, r_score


def reverse_hyps(hyps: torch.Tensor, hyps_lens: torch.Tensor, eos: int) -> torch.Tensor:
    """<sos> y1..yn pad -> <sos> yn..y1 <eos>...: the right-to-left decoder's input (gather-based,
    as WeNet's ONNX-friendly version; same as model/targets.py's reverse + add_sos_eos)."""
    body = hyps[:, 1:]
    lens = (hyps_lens - 1).unsqueeze(1)
    pos = torch.arange(body.size(1), device=hyps.device).unsqueeze(0)
    rev = body.gather(1, (lens - 1 - pos).clamp(min=0))
    rev = torch.where(pos < lens, rev, torch.full_like(body, eos))
    return torch.cat([hyps[:, :1], rev], dim=1)


def script_model(model: U2Model) -> torch.jit.ScriptModule:
    """`torch.jit.script` of the runtime view of an eval-mode model."""
    return torch.jit.script(RuntimeModule(model.eval()))


def export_torchscript(model: U2Model, path: str | Path) -> torch.jit.ScriptModule:
    """Script the model and save it (`torch.jit.save`); returns the scripted module."""
    scripted = script_model(model)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(path))
    return scripted
