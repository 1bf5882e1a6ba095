"""A live transcription stream: audio pieces in, a growing partial text out, a Result at the end."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .audio_input import mono_waveform
from .result import Result
from .streaming.recognizer import StreamingRecognizer


class Stream:
    """accept() pieces of one recording as they arrive, then finish(); reusable afterwards."""

    def __init__(self, recognizer: StreamingRecognizer, make_result: Callable[..., Result], sample_rate: int):
        self.recognizer, self.make_result, self.sample_rate = recognizer, make_result, sample_rate
        self.samples = 0

    def accept(self, samples: np.ndarray | torch.Tensor, sample_rate: int | None = None) -> str:
        """Feed the next piece (mono or [samples, channels]); returns the partial text so far,
        which only grows by appending."""
        if sample_rate is not None and sample_rate != self.sample_rate:
            # Resampling piece by piece would put edge artefacts at every boundary.
            raise ValueError(f"a stream takes audio at the model's {self.sample_rate} Hz, got {sample_rate} Hz: "
                             "resample the recording as a whole first")
        wave = mono_waveform(samples, self.sample_rate, self.sample_rate)
        self.samples += wave.numel()
        return self.recognizer.accept_waveform(wave)

    def finish(self) -> Result:
        """The final result (the n-best rescored by the attention decoders), with word times."""
        ids = self.recognizer.finalize_ids()
        result = self.make_result(ids, self.recognizer.log_probs(), self.samples / self.sample_rate,
                                  "attention_rescoring")
        self.recognizer.reset()
        self.samples = 0
        return result
