"""Real-time recognition of one audio stream: feed pieces, read partial results, finalize.

    rec = StreamingRecognizer(model, units, data_cfg, chunk_size=16)
    for piece in microphone():
        partial = rec.accept_waveform(piece)   # CTC greedy text so far: only ever grows
    text = rec.finalize()                      # attention rescoring of the final n-best
    rec.reset()                                # ready for the next utterance

Each chunk is encoded once with the caches (EncoderStream) and its CTC posteriors extend the
prefix beam search; the final chunk may be shorter. The partial text is CTC greedy over the frames
so far rather than the beam's current best: new frames can only append to it, so a caption built
from it never rewrites what it has shown, while the beam's best may switch to another prefix. The result equals `u2moe decode
--chunk-size N --modes attention_rescoring` on the same audio.
"""
from __future__ import annotations

import torch

from ...configs.data import DataConfig
from ...data_prep.tokenizer import Tokenizer
from ...model.asr_model import U2Model
from ...model.attention import avoid_per_shape_attention_plans
from ..decoding.ctc_prefix_beam import CtcPrefixBeamSearch
from ..decoding.device import model_dtype
from ..decoding.rescoring import attention_rescoring
from .encoder_stream import EncoderStream
from .fbank_stream import FbankStream


class StreamingRecognizer:
    def __init__(self, model: U2Model, units: list[str], data_cfg: DataConfig, chunk_size: int = 16,
                 num_left_chunks: int = -1, beam: int = 10, ctc_weight: float = 0.3,
                 reverse_weight: float = 0.5):
        avoid_per_shape_attention_plans()  # every chunk's cache length is a new shape
        self.model = model.eval()
        self.tokenizer = Tokenizer("char", units)  # only joins units into text
        self.fbank = FbankStream(data_cfg)
        self.encoder = EncoderStream(model.encoder, chunk_size, num_left_chunks)
        self.search = CtcPrefixBeamSearch(beam, model.ctc.blank_id)
        self.ctc_weight, self.reverse_weight = ctc_weight, reverse_weight
        self.reset()

    def reset(self) -> None:
        self.fbank.reset()
        self.encoder.reset()
        self.search.reset()
        self.feats = torch.zeros(0, self.fbank.cfg.fbank.num_mel_bins)
        self.memory: list[torch.Tensor] = []
        self.chunk_log_probs: list[torch.Tensor] = []
        self.greedy: list[int] = []
        self.last_frame_unit = -1  # the previous frame's best unit, for merging repeats across chunks

    @torch.inference_mode()
    def accept_waveform(self, samples: torch.Tensor) -> str:
        """Feed audio (1-D float in [-1, 1] at the model's sample rate); returns the partial text."""
        self.feats = torch.cat([self.feats, self.fbank.accept(samples)])
        geo = self.encoder.geometry
        while self.feats.size(0) >= geo.window:
            self._encode(self.feats[:geo.window])
            self.feats = self.feats[geo.stride:]
        return self.partial()

    def partial(self) -> str:
        return self.tokenizer.decode(self.greedy)

    def finalize(self) -> str:
        """Encode what is left (a shorter last chunk) and rescore the n-best; returns the text."""
        return self.tokenizer.decode(self.finalize_ids())

    @torch.inference_mode()
    def finalize_ids(self) -> list[int]:
        """finalize's unit ids."""
        if self.feats.size(0) > self.encoder.geometry.right_context:
            self._encode(self.feats)
        self.feats = self.feats[:0]
        if not self.memory:
            return []
        memory = torch.cat(self.memory, dim=1)
        valid = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        return attention_rescoring(self.model, memory, valid, [self.search.nbest()], self.ctc_weight,
                                   self.reverse_weight)[0]

    def log_probs(self) -> torch.Tensor:
        """CTC log posteriors [T, V] of every frame encoded so far."""
        if not self.chunk_log_probs:
            return torch.zeros(0, self.model.cfg.vocab_size)
        return torch.cat(self.chunk_log_probs)

    def _encode(self, window: torch.Tensor) -> None:
        param = self.model.ctc.ctc_lo.weight
        out = self.encoder.step(window.unsqueeze(0).to(param.device, model_dtype(self.model)))
        self.memory.append(out)
        log_probs = self.model.ctc.log_softmax(out)[0]
        self.chunk_log_probs.append(log_probs)
        self.search.step(log_probs)
        for unit in log_probs.argmax(dim=-1).tolist():
            if unit != self.last_frame_unit and unit != self.model.ctc.blank_id:
                self.greedy.append(unit)
            self.last_frame_unit = unit
