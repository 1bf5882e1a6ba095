"""Decoding input: utterances (key, transcript, waveform) from a shard list or a Kaldi data dir.

A transcript is only the reference to score against: utterances without one (no `text` line,
or no `text` file at all) are decoded all the same, with an empty text.

Audio goes through data_prep's own reading and resampling (SampleProcessor in its
device-features mode yields the waveform), and features through data_prep's fbank, so decoding
sees exactly the features training saw.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...configs.data import BatchConfig, DataConfig, FilterConfig
from ...data_prep import audio
from ...data_prep.errors import DataPrepError
from ...data_prep.features import fbank_module
from ...data_prep.kaldi_dir import read_kaldi_dir
from ...data_prep.sample_processor import SampleProcessor
from ...data_prep.shard_reader import RawUtterance, read_shard
from ...data_prep.sharding import read_shard_list
from ...data_prep.stats import DataStats


@dataclass
class AudioUtterance:
    key: str
    text: str  # the reference; empty when there is none
    wave: torch.Tensor  # [S] float in [-1, 1] at the model's sample rate
    duration: float  # seconds


def decoding_data_config(experiment_config: dict[str, Any] | None, source: str = "model.pt") -> DataConfig:
    """The model's `data:` section (sample rate, fbank) with nothing filtered out by length."""
    section = (experiment_config or {}).get("data")
    cfg = DataConfig.from_dict(section, source=source)
    unlimited = FilterConfig(min_frames=1, max_frames=10 ** 9, min_tokens=1, max_tokens=10 ** 9)
    return dataclasses.replace(cfg, filter=unlimited, batch=BatchConfig(), device_features=True)


def batch_fbank(waves: list[torch.Tensor], cfg: DataConfig, device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(feats [B, T, mel] float32, zero-padded as the data pipeline's batches are; lengths [B]) on
    `device`, without dither. The waveforms go there padded, in one copy, and their fbank is
    computed there as one batch: on a GPU no per-utterance feature work is left on the host."""
    lengths = torch.tensor([w.numel() for w in waves], dtype=torch.long)
    wavs = torch.nn.utils.rnn.pad_sequence(list(waves), batch_first=True).to(device)
    return fbank_module(cfg.fbank, cfg.sample_rate, str(wavs.device))(wavs, lengths.to(wavs.device))


def _raw_from_data_dir(data_dir: Path, stats: DataStats) -> Iterator[RawUtterance]:
    kaldi = read_kaldi_dir(data_dir, require_text=False)
    # What is left is a key without audio (a `text` line, or a segment of an unknown recording).
    for key, kind in kaldi.problems:
        stats.record("missing_audio", str(data_dir), key, kind)
    for utt in kaldi.utterances:
        if utt.segment is not None:
            raise DataPrepError(f"{data_dir}/segments: segment cuts are not read here; "
                                f"make shards with `u2moe prep shards` and pass --shards")
        try:
            data = audio.read_source(utt.source)
            ext = audio.extension_for(audio.probe(data))
        except audio.AudioError as err:
            stats.record(err.kind, str(data_dir), utt.key, f"{utt.source}: {err}")
            continue
        yield RawUtterance(str(data_dir), utt.key, {ext: data, "txt": utt.text.encode("utf-8")})


def read_utterances(cfg: DataConfig, stats: DataStats, *, shards: str | None = None,
                    data_dir: str | None = None, limit: int | None = None) -> Iterator[AudioUtterance]:
    """Utterances in input order; unreadable ones are recorded in `stats` and skipped."""
    if (shards is None) == (data_dir is None):
        raise ValueError("give exactly one of shards and data_dir")
    if shards is not None:
        raws = (raw for url in read_shard_list(shards) for raw in read_shard(url, stats))
    else:
        raws = _raw_from_data_dir(Path(data_dir), stats)
    process = SampleProcessor(cfg, None, False, stats, random.Random(0), torch.Generator())
    count = 0
    for raw in raws:
        if limit is not None and count >= limit:
            return
        text = raw.members.get("txt", b"").decode("utf-8", errors="replace").strip()
        sample = process(raw)
        if sample is None:
            continue
        count += 1
        yield AudioUtterance(raw.key, text, sample.wave, sample.duration)
