"""The input pipeline's configuration: one dataclass tree, validated when it is built.

The trainer's yaml carries it as its `data:` section and hands that mapping to
`DataConfig.from_dict(d, source="exp.yaml")`; a misspelt key is an error naming the key and the
file, never a silently ignored default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .loading import from_dict, to_dict


@dataclass(frozen=True)
class FbankConfig:
    """Kaldi-compatible log mel filterbank; the defaults are WeNet's."""

    num_mel_bins: int = 80
    frame_length: float = 25.0  # ms
    frame_shift: float = 10.0  # ms
    dither: float = 0.1  # training only; evaluation always uses 0
    energy_floor: float = 0.0

    def __post_init__(self) -> None:
        _check(self.num_mel_bins > 3, "fbank.num_mel_bins must be > 3")
        _check(0 < self.frame_shift <= self.frame_length, "fbank needs 0 < frame_shift <= frame_length")
        _check(self.dither >= 0, "fbank.dither must be >= 0")


@dataclass(frozen=True)
class SpecAugConfig:
    """Frequency and time masks (WeNet's spec_aug defaults); applied in training only."""

    enabled: bool = True
    num_freq_masks: int = 2
    max_freq_width: int = 10
    num_time_masks: int = 2
    max_time_width: int = 50

    def __post_init__(self) -> None:
        _check(min(self.num_freq_masks, self.num_time_masks) >= 0, "spec_aug mask counts must be >= 0")
        _check(min(self.max_freq_width, self.max_time_width) >= 1, "spec_aug mask widths must be >= 1")


@dataclass(frozen=True)
class SpeedPerturbConfig:
    """Kaldi/WeNet-style speed perturbation (tempo and pitch together); training only."""

    enabled: bool = False
    speeds: tuple[float, ...] = (0.9, 1.0, 1.1)

    def __post_init__(self) -> None:
        _check(len(self.speeds) > 0 and all(0.5 <= s <= 2.0 for s in self.speeds),
               "speed_perturb.speeds must be a non-empty list of factors in [0.5, 2]")


@dataclass(frozen=True)
class FilterConfig:
    """Utterances outside these limits are skipped (and counted); frames are 10 ms fbank frames."""

    min_frames: int = 10
    max_frames: int = 3000
    min_tokens: int = 1
    max_tokens: int = 200

    def __post_init__(self) -> None:
        # Fewer samples than one analysis window give no frame at all; fbank cannot run on them.
        _check(1 <= self.min_frames <= self.max_frames, "filter needs 1 <= min_frames <= max_frames")
        _check(1 <= self.min_tokens <= self.max_tokens, "filter needs 1 <= min_tokens <= max_tokens")


@dataclass(frozen=True)
class BatchConfig:
    """Shuffle buffer, sort buffer and batching.

    static: `batch_size` utterances per batch. dynamic: as many utterances as fit
    max_len_in_batch * n <= max_frames_in_batch (padded frames), as in WeNet. bucket: fixed
    shapes, for CUDA graphs (`train.cuda_graphs`): utterances of (k-1) * bucket_frames < frames
    <= k * bucket_frames are padded to k * bucket_frames, max_frames_in_batch // (k * bucket_frames)
    to a batch, and targets to a multiple of bucket_tokens; no sort buffer.
    """

    type: Literal["static", "dynamic", "bucket"] = "static"
    batch_size: int = 16
    max_frames_in_batch: int = 12000
    bucket_frames: int = 50
    bucket_tokens: int = 16
    shuffle_buffer: int = 1500  # training only; 0 disables
    sort_buffer: int = 500  # sort by length inside windows of this many utterances; 0 disables

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1 and self.max_frames_in_batch >= 1, "batch sizes must be >= 1")
        _check(self.bucket_frames >= 1 and self.bucket_tokens >= 1, "bucket sizes must be >= 1")
        _check(self.shuffle_buffer >= 0 and self.sort_buffer >= 0, "buffer sizes must be >= 0")


@dataclass(frozen=True)
class DataConfig:
    sample_rate: int = 16000  # everything is resampled to this rate before features
    fbank: FbankConfig = field(default_factory=FbankConfig)
    spec_aug: SpecAugConfig = field(default_factory=SpecAugConfig)
    speed_perturb: SpeedPerturbConfig = field(default_factory=SpeedPerturbConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    # True: workers only decode; batches carry padded waveforms and the trainer runs
    # `FeatureExtractor` (fbank + SpecAugment) on its device.
    device_features: bool = False

    def __post_init__(self) -> None:
        _check(self.sample_rate > 0, "sample_rate must be positive")
        if self.batch.type in ("dynamic", "bucket"):
            # An utterance longer than the budget could only go into an over-budget batch.
            _check(self.filter.max_frames <= self.batch.max_frames_in_batch,
                   f"filter.max_frames ({self.filter.max_frames}) exceeds batch.max_frames_in_batch "
                   f"({self.batch.max_frames_in_batch}): such an utterance fits no batch")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, source: str = "<dict>") -> "DataConfig":
        """Build from a plain mapping (e.g. a yaml `data:` section); errors name the key and source."""
        return from_dict(cls, d or {}, source, prefix="data")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
