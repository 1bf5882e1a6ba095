"""One utterance from tar members to a training sample: checks, decoding, features.

Order of work is cheapest-first: transcript checks and token filters run before the audio is
decoded, length filters before fbank. Every rejection or repair is recorded in DataStats with its
shard and key; nothing here raises on bad data.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from ..configs.data import DataConfig
from . import audio
from .features import compute_fbank, num_frames
from .shard_reader import RawUtterance
from .specaug import spec_augment
from .stats import DataStats
from .tokenizer import Tokenizer


@dataclass
class Sample:
    key: str
    num_frames: int  # fbank frames (after speed perturbation)
    duration: float  # seconds of the stored audio, before speed perturbation
    target: list[int]
    feats: torch.Tensor | None = None  # [T, mel]: CPU feature path
    wave: torch.Tensor | None = None  # [S] at cfg.sample_rate, in [-1, 1]: device feature path


class SampleProcessor:
    """Callable RawUtterance -> Sample | None. `tokenizer=None` skips everything about text
    (CMVN statistics need only the audio)."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer | None, train: bool, stats: DataStats,
                 rng: random.Random, generator: torch.Generator):
        self.cfg, self.tokenizer, self.train, self.stats = cfg, tokenizer, train, stats
        self.rng, self.generator = rng, generator

    def __call__(self, raw: RawUtterance) -> Sample | None:
        target = self._target(raw) if self.tokenizer is not None else []
        if target is None:
            return None
        wave, duration = self._waveform(raw)
        if wave is None:
            return None
        frames = num_frames(len(wave), self.cfg.fbank, self.cfg.sample_rate)
        limits = self.cfg.filter
        if frames < limits.min_frames or frames > limits.max_frames:
            kind = "too_short" if frames < limits.min_frames else "too_long"
            self.stats.record(kind, raw.shard, raw.key, f"{frames} frames")
            return None
        if self.cfg.device_features:
            return Sample(raw.key, frames, duration, target, wave=wave)
        dither = self.cfg.fbank.dither if self.train else 0.0
        feats = compute_fbank(wave, self.cfg.fbank, self.cfg.sample_rate, dither, self.generator)
        if self.train and self.cfg.spec_aug.enabled:
            feats = spec_augment(feats[None], torch.tensor([frames]), self.cfg.spec_aug, self.generator)[0]
        return Sample(raw.key, frames, duration, target, feats=feats)

    def _target(self, raw: RawUtterance) -> list[int] | None:
        record = self.stats.record
        data = raw.members.get("txt")
        if data is None:
            record("missing_transcript", raw.shard, raw.key, f"members: {sorted(raw.members)}")
            return None
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            record("bad_transcript", raw.shard, raw.key, str(err))
            return None
        if not text:
            record("empty_transcript", raw.shard, raw.key)
            return None
        target = self.tokenizer.encode(text)
        unknown = self.tokenizer.count_unknown(target)
        if unknown:
            self.stats.unknown_unit_count += unknown
            record("unknown_units", raw.shard, raw.key, " ".join(self.tokenizer.unknown_units(text)))
        limits = self.cfg.filter
        if len(target) < limits.min_tokens or len(target) > limits.max_tokens:
            kind = "too_few_tokens" if len(target) < limits.min_tokens else "too_many_tokens"
            record(kind, raw.shard, raw.key, f"{len(target)} tokens")
            return None
        return target

    def _waveform(self, raw: RawUtterance) -> tuple[torch.Tensor | None, float]:
        ext = next((e for e in audio.AUDIO_EXTENSIONS if e in raw.members), None)
        if ext is None:
            self.stats.record("missing_audio", raw.shard, raw.key, f"members: {sorted(raw.members)}")
            return None, 0.0
        try:
            samples, rate, channels = audio.decode(raw.members[ext])
        except audio.AudioError as err:
            self.stats.record(err.kind, raw.shard, raw.key, f".{ext}: {err}")
            return None, 0.0
        if channels > 1:
            self.stats.record("multichannel", raw.shard, raw.key, f"{channels} channels, first kept")
        wave = torch.from_numpy(np.ascontiguousarray(samples[:, 0]))
        duration = len(wave) / rate
        if rate != self.cfg.sample_rate:
            self.stats.record("resampled", raw.shard, raw.key, f"{rate} Hz -> {self.cfg.sample_rate} Hz")
            wave = audio.resample(wave, rate, self.cfg.sample_rate)
        if self.train and self.cfg.speed_perturb.enabled:
            wave = audio.speed_perturb(wave, self.cfg.sample_rate, self.rng.choice(self.cfg.speed_perturb.speeds))
        return wave, duration
