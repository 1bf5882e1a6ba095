"""`u2moe prep cmvn`: global fbank mean/variance statistics in WeNet's global_cmvn JSON format.

Features are computed exactly as the evaluation pipeline does (same SampleProcessor: decode,
resample, fbank without dither, no augmentation), so the statistics match what the model sees.
Sums are accumulated in float64. Shards are processed in list order -- in parallel over --jobs --
and `max_utts` takes the first utterances in that order, so the result does not depend on jobs.
"""
from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..configs.data import BatchConfig, DataConfig, FilterConfig
from .done_marker import PreparedOutput, fingerprint
from .progress_bar import progress_bar
from .sample_processor import SampleProcessor
from .shard_reader import read_shard
from .sharding import read_shard_list
from .stats import DataStats

logger = logging.getLogger(__name__)

# Per-utterance partial sums: (sum x, sum x^2, frames) over one utterance, float64, and its seconds.
_Partial = tuple[np.ndarray, np.ndarray, int, float]


def _shard_partials(url: str, cfg: DataConfig, limit: int | None) -> tuple[list[_Partial], DataStats]:
    stats = DataStats()
    # Evaluation mode draws no random numbers; the generators only satisfy the interface.
    process = SampleProcessor(cfg, None, False, stats, random.Random(0), torch.Generator())
    partials: list[_Partial] = []
    for raw in read_shard(url, stats):
        sample = process(raw)
        if sample is None:
            continue
        x = sample.feats.double().numpy()
        partials.append((x.sum(axis=0), np.square(x).sum(axis=0), x.shape[0], sample.duration))
        if limit is not None and len(partials) >= limit:
            break
    return partials, stats


def _single_threaded() -> None:
    # A forked child must not enter the parent's OpenMP pool (GNU libgomp then hangs for good);
    # one intra-op thread per process is also the right split, as in data-loader workers.
    torch.set_num_threads(1)


def _partials_in_order(shards: list[str], cfg: DataConfig, limit: int | None, jobs: int
                       ) -> Iterator[tuple[list[_Partial], DataStats]]:
    if jobs == 1:
        for url in shards:
            yield _shard_partials(url, cfg, limit)
        return
    with ProcessPoolExecutor(max_workers=jobs, initializer=_single_threaded) as pool:
        # A window of jobs shards in flight: enough to keep every process busy, while stopping
        # early at max_utts wastes at most one window.
        futures = [pool.submit(_shard_partials, url, cfg, limit) for url in shards[:jobs]]
        next_shard = jobs
        while futures:
            result = futures.pop(0).result()
            if next_shard < len(shards):
                futures.append(pool.submit(_shard_partials, shards[next_shard], cfg, limit))
                next_shard += 1
            yield result


def compute_cmvn(shards: str | Path | list[str], out: str | Path, cfg: DataConfig | None = None,
                 max_utts: int | None = None, jobs: int = 1, overwrite: bool = False) -> dict[str, Any]:
    cfg = cfg or DataConfig()
    # The filters that matter for training do not apply: every decodable utterance counts.
    cfg = replace(cfg, filter=FilterConfig(min_frames=1, max_frames=10**9), batch=BatchConfig(),
                  device_features=False)
    shard_list = read_shard_list(shards)
    out = Path(out)
    local = [Path(s) for s in shard_list if Path(s).exists()]
    content = [Path(shards)] if not isinstance(shards, list) else []
    fp = fingerprint({"command": "cmvn", "shards": shard_list, "max_utts": max_utts,
                      "fbank": cfg.fbank, "sample_rate": cfg.sample_rate}, content_files=content, stat_files=local)
    target = PreparedOutput(out, owned=(), is_dir=False)
    done = target.make_room(fp, overwrite)
    if done is not None:
        logger.info("%s is up to date (%s frames); nothing to do", out, done.get("frame_num"))
        return done

    dim = cfg.fbank.num_mel_bins
    mean_stat, var_stat, frames, utts = np.zeros(dim), np.zeros(dim), 0, 0
    stats = DataStats()
    with progress_bar(_partials_in_order(shard_list, cfg, max_utts, jobs), "prep cmvn", len(shard_list),
                      "shard") as shards_done:
        for partials, shard_stats in shards_done:
            stats.merge(shard_stats)
            for s, sq, n, seconds in partials:
                if max_utts is not None and utts >= max_utts:
                    break
                mean_stat += s
                var_stat += sq
                frames += n
                utts += 1
                stats.audio_seconds += seconds
            if max_utts is not None and utts >= max_utts:
                break
    if frames == 0:
        raise ValueError(f"no usable utterance in {shards}")
    stats.utterances = utts
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"mean_stat": mean_stat.tolist(), "var_stat": var_stat.tolist(),
                               "frame_num": frames}) + "\n")
    tmp.replace(out)
    summary = {"utterances": utts, "frame_num": frames, "skipped": dict(stats.counts)}
    target.mark_done(fp, [out], summary)
    logger.info("cmvn over %d utterances (%d frames) -> %s", utts, frames, out)
    if stats.skipped:
        logger.warning(stats.summary("cmvn input"))
    return summary
