"""Transcription from Python: a model file in, text with word times out.

    asr = u2moe.load("model.pt")                  # device="cpu", dtype="fp32", mode=...
    asr.transcribe("a.wav").text                  # a path, a waveform (sample_rate=...) or a list
    s = asr.stream(chunk_size=16)                 # live: s.accept(samples) -> partial text,
                                                  # s.finish() -> Result (attention rescoring)

Hypotheses are those of `u2moe decode` on the same audio: the same fbank (data_prep), the same
encoder pass and search (decoding/search.py); a list is decoded in batches of similar length.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data_prep.features import samples_for_frames
from ..model.asr_model import U2Model
from .audio_input import AudioError, mono_waveform, read_waveform
from .decoding.data import batch_fbank, decoding_data_config
from .decoding.device import model_dtype, prepare_model
from .decoding.search import DecodeOptions, check_modes, decode_encoded, encode
from .live_stream import Stream
from .model_file import load_model_file
from .result import Result, ResultMaker
from .streaming.recognizer import StreamingRecognizer

Audio = str | Path | np.ndarray | torch.Tensor


class Transcriber:
    def __init__(self, model: U2Model, config: dict, units: list[str], *, device: str = "cpu",
                 dtype: str = "fp32", mode: str = "attention_rescoring", options: DecodeOptions = DecodeOptions(),
                 batch_size: int = 16):
        check_modes([mode])
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = prepare_model(model, device, dtype)
        self.device, self.mode, self.options, self.batch_size = device, mode, options, batch_size
        self.data_cfg = decoding_data_config(config)
        self.sample_rate = self.data_cfg.sample_rate
        embed = self.model.encoder.embed
        # The fewest samples that give one encoder frame; anything shorter holds nothing to decode.
        self.min_samples = samples_for_frames(embed.right_context + 1, self.data_cfg.fbank, self.sample_rate)
        frame_seconds = embed.subsampling_rate * self.data_cfg.fbank.frame_shift / 1000
        self.make_result = ResultMaker(units, frame_seconds)
        self.units = units

    def waveform(self, audio: Audio, sample_rate: int | None = None) -> torch.Tensor:
        """Mono float32 at the model's rate from a path or samples; AudioError if unusable."""
        if isinstance(audio, (str, Path)):
            wave = read_waveform(Path(audio), self.sample_rate)
        else:
            if sample_rate is None:
                raise ValueError("a waveform needs its sample_rate")
            wave = mono_waveform(audio, sample_rate, self.sample_rate)
        if wave.numel() < self.min_samples:
            raise AudioError(f"too short: {wave.numel() / self.sample_rate:.3f} s, the model needs "
                             f"at least {self.min_samples / self.sample_rate:.3f} s")
        return wave

    def transcribe(self, audio: Audio | list[Audio], sample_rate: int | None = None) -> Result | list[Result]:
        """One Result for one path or waveform, a list of them for a list (whose waveforms all
        have `sample_rate`)."""
        if isinstance(audio, list):
            return self.transcribe_waveforms([self.waveform(a, sample_rate) for a in audio])
        return self.transcribe_waveforms([self.waveform(audio, sample_rate)])[0]

    def transcribe_waveforms(self, waves: list[torch.Tensor]) -> list[Result]:
        """Results in input order; decoded in batches of similar length, so that little of
        each batch is padding."""
        order = sorted(range(len(waves)), key=lambda i: waves[i].numel())
        results: list[Result | None] = [None] * len(waves)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            for i, result in zip(batch, self._decode([waves[i] for i in batch])):
                results[i] = result
        return results

    def _decode(self, waves: list[torch.Tensor]) -> list[Result]:
        feats, lengths = batch_fbank(waves, self.data_cfg, self.device)
        with torch.inference_mode():
            memory, valid = encode(self.model, feats.to(model_dtype(self.model)), lengths, self.options)
            hyps = decode_encoded(self.model, memory, valid, [self.mode], self.options)[self.mode]
            log_probs = self.model.ctc.log_softmax(memory)
        frames = valid.sum(dim=1).tolist()
        return [self.make_result(ids, log_probs[i, :frames[i]], wave.numel() / self.sample_rate, self.mode)
                for i, (ids, wave) in enumerate(zip(hyps, waves))]

    def stream(self, chunk_size: int = 16, left_chunks: int = -1) -> Stream:
        """A live stream: chunk_size encoder frames per step (40 ms each at 4x subsampling)."""
        opts = self.options
        recognizer = StreamingRecognizer(self.model, self.units, self.data_cfg, chunk_size, left_chunks,
                                         opts.beam, opts.ctc_weight, opts.reverse_weight)
        return Stream(recognizer, self.make_result, self.sample_rate)


def load(path: str | Path, *, device: str = "cpu", dtype: str = "fp32", mode: str = "attention_rescoring",
         chunk_size: int = -1, left_chunks: int = -1, beam: int = 10, ctc_weight: float = 0.3,
         reverse_weight: float = 0.5, batch_size: int = 16) -> Transcriber:
    """A Transcriber for a model file written by `u2moe export`. mode: ctc_greedy,
    ctc_prefix_beam, attention or attention_rescoring; chunk_size > 0 decodes chunk by chunk as
    streaming would (left_chunks: chunks of left context kept, -1 all)."""
    model, config, units = load_model_file(path)
    options = DecodeOptions(beam=beam, ctc_weight=ctc_weight, reverse_weight=reverse_weight,
                            chunk_size=chunk_size, left_chunks=left_chunks)
    return Transcriber(model, config, units, device=device, dtype=dtype, mode=mode, options=options,
                       batch_size=batch_size)
