"""The batch pipeline: partitioning, round trip, WeNet shards, damaged input, batching, config."""
from __future__ import annotations

import logging
import multiprocessing
import random
import tarfile
import time
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from test_data_support import LETTERS, make_kaldi_dir, read_kaldi_table, shared_corpus, tone, wav_bytes, write_tar
from u2moe.data_prep import DataConfig, Tokenizer, build_dataloader
from u2moe.data_prep.batching import IGNORE_ID, bucket_batches, dynamic_batches
from u2moe.data_prep.features import KaldiFbank
from u2moe.configs.loading import ConfigError
from u2moe.data_prep.sample_processor import Sample
from u2moe.data_prep.shard_writer import write_shards
from u2moe.data_prep.errors import DataPrepError
from u2moe.data_prep.sharding import read_shard_list, shards_for_reader
from u2moe.data_prep.units import train_units


@pytest.fixture(scope="module")
def letters() -> Tokenizer:
    return Tokenizer("char", LETTERS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 synth-en utterances in 6 shards, and a bpe tokenizer trained on their text."""
    root = tmp_path_factory.mktemp("corpus")
    data_dir, utts = make_kaldi_dir(root, count=12)
    write_shards(data_dir, root / "shards", utts_per_shard=2)
    train_units(data_dir / "text", root / "units", "bpe", vocab_size=60)
    return root / "shards" / "shards.list", Tokenizer.load(root / "units"), utts


def _collect(loader) -> list[dict]:
    return [batch for batch in loader]


def test_partition_reads_every_utterance_once_per_epoch():
    utts = 6  # per shard: utterance i of shard s is read by the reader whose part of s holds i
    for n in range(0, 14):
        shards = [f"s{i}" for i in range(n)]
        for world in (1, 2, 3, 4):
            for workers in (1, 2, 3, 6):
                for epoch in (0, 1):
                    parts = {(r, w): shards_for_reader(shards, seed=7, epoch=epoch, shuffle=True, rank=r,
                                                       world_size=world, worker=w, num_workers=workers)
                             for r in range(world) for w in range(workers)}
                    read = Counter((p.url, i) for ps in parts.values() for p in ps
                                   for i in range(utts) if i % p.parts == p.part)
                    assert read == Counter({(s, i): 1 for s in shards for i in range(utts)})
                    # Ranks step in lock-step: each reads as many shards or shard parts, whatever
                    # the worker count (e.g. 8 shards on 4 ranks x 6 workers must leave no rank without).
                    per_rank = [sum(len(parts[r, w]) for w in range(workers)) for r in range(world)]
                    assert len(set(per_rank)) <= 1, (n, world, workers, per_rank)
    orders = {tuple(shards_for_reader([f"s{i}" for i in range(20)], seed=7, epoch=e, shuffle=True, rank=0,
                                      world_size=1, worker=0, num_workers=1)) for e in range(3)}
    assert len(orders) == 3  # a new order every epoch


def test_three_shards_on_two_lock_step_ranks_train_every_utterance(tmp_path, letters):
    """Ranks step together until the first runs out of batches; the shard left over is shared."""
    good = wav_bytes(tone(0.5, seed=1), 16000)
    shards, keys = [], set()
    for s in range(3):
        members = []
        for i in range(4):
            members += [(f"s{s}u{i}.wav", good), (f"s{s}u{i}.txt", b"AB")]
        shards.append(str(write_tar(tmp_path / f"shard{s}.tar", members)))
        with tarfile.open(shards[-1]) as tar:
            keys |= {m.name.rsplit(".", 1)[0] for m in tar.getmembers()}
    cfg = DataConfig.from_dict({"batch": {"type": "static", "batch_size": 2}})
    for epoch in (0, 1):
        streams = []
        for rank in (0, 1):
            loader = build_dataloader(shards, letters, cfg, train=True, seed=3, rank=rank, world_size=2)
            streams.append(loader.epoch_batches(epoch, prefetch_next=False))
        trained = Counter(k for step in zip(*streams) for batch in step for k in batch["keys"])
        assert trained == Counter({k: 1 for k in keys}), f"epoch {epoch}"


def test_every_utterance_once_per_epoch_across_ranks_and_workers(corpus):
    shard_list, tok, utts = corpus
    cfg = DataConfig.from_dict({"batch": {"batch_size": 2, "shuffle_buffer": 3, "sort_buffer": 2},
                                "speed_perturb": {"enabled": True}})
    orders = []
    for epoch in (0, 1):
        seen = Counter()
        order = []
        delivered = 0
        for rank in (0, 1):
            loader = build_dataloader(shard_list, tok, cfg, train=True, seed=3, rank=rank, world_size=2,
                                      num_workers=2)
            loader.set_epoch(epoch)
            for batch in _collect(loader):
                assert batch["feats"].dtype == torch.float32 and batch["feats"].shape[2] == 80
                assert batch["target"].dtype == torch.int64 and batch["feats_lengths"].dtype == torch.int64
                for i, key in enumerate(batch["keys"]):
                    seen[key] += 1
                    order.append(key)
                    n = int(batch["target_lengths"][i])
                    assert tok.decode(batch["target"][i, :n].tolist()) == utts[key][0]
                    assert (batch["target"][i, n:] == -1).all()
                    assert batch["durations"][i] == pytest.approx(utts[key][1], abs=1e-3)
                    # Speed perturbation changes the frame count by at most the 0.9/1.1 factors.
                    frames = int(batch["feats_lengths"][i])
                    assert 0.85 * utts[key][1] * 100 < frames < 1.15 * utts[key][1] * 100
                    assert (batch["feats"][i, frames:] == 0).all()
            delivered += loader.epoch_stats.utterances
        assert seen == Counter({k: 1 for k in utts}), f"epoch {epoch}"
        assert delivered == len(utts)  # the stats gathered from the workers agree
        orders.append(order)
    assert orders[0] != orders[1]


def test_prefetched_epoch_equals_a_fresh_one(corpus):
    """Epoch 1's workers started during epoch 0 deliver exactly what a fresh epoch 1 delivers,
    and epoch 0 is not disturbed by them."""
    shard_list, tok, _ = corpus
    cfg = DataConfig.from_dict({"batch": {"batch_size": 2, "shuffle_buffer": 3}})

    def keys(batches):
        return [k for b in batches for k in b["keys"]]

    fresh = []
    for epoch in (0, 1):
        loader = build_dataloader(shard_list, tok, cfg, train=True, seed=5, num_workers=2)
        loader.set_epoch(epoch)
        fresh.append(keys(_collect(loader)))
    assert fresh[0] != fresh[1]
    loader = build_dataloader(shard_list, tok, cfg, train=True, seed=5, num_workers=2)
    loader.set_epoch(0)
    first = iter(loader)
    loader.prefetch(1)
    assert keys(first) == fresh[0]
    assert loader.epoch_stats.utterances == len(fresh[0])
    loader.set_epoch(1)
    assert keys(loader) == fresh[1]
    assert loader.epoch_stats.utterances == len(fresh[1])

    # A reader that stops early drops the prefetched epoch: its workers exit, and the epoch
    # read later is still the same.
    before = set(multiprocessing.active_children())
    loader.prefetch(1)
    assert len(set(multiprocessing.active_children()) - before) == 2
    loader.drop_prefetch()
    deadline = time.monotonic() + 30
    while set(multiprocessing.active_children()) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(multiprocessing.active_children()) - before
    assert keys(loader) == fresh[1]


def test_training_refuses_a_rank_without_shards(corpus):
    """A rank with no shard would end every lock-step epoch before its first step."""
    shard_list, tok, _ = corpus
    shards = read_shard_list(shard_list)
    with pytest.raises(DataPrepError, match=f"{len(shards)} shard\\(s\\) for {len(shards) + 1} ranks"):
        build_dataloader(shard_list, tok, DataConfig(), train=True, rank=0, world_size=len(shards) + 1)
    # Evaluation lets a dataless rank run placeholder batches, so it only warns.
    build_dataloader(shard_list, tok, DataConfig(), train=False, rank=0, world_size=len(shards) + 1)


def test_eval_is_deterministic_and_reports_utterance_totals(corpus):
    shard_list, tok, utts = corpus
    cfg = DataConfig()
    runs = []
    for _ in range(2):
        loader = build_dataloader(shard_list, tok, cfg, train=False, num_workers=2)
        runs.append(_collect(loader))
        assert loader.epoch_stats.utterances == len(utts)
        assert loader.epoch_stats.audio_seconds == pytest.approx(sum(u[1] for u in utts.values()), abs=0.02)
        assert loader.epoch_stats.skipped == 0
    for a, b in zip(*runs):
        assert a["keys"] == b["keys"] and torch.equal(a["feats"], b["feats"])


def test_pipe_urls_stream_the_same_batches(corpus, tmp_path):
    shard_list, tok, utts = corpus
    local = shard_list.read_text().split()
    (tmp_path / "pipes.list").write_text("".join(f"pipe:cat {p}\n" for p in local))
    runs = [_collect(build_dataloader(lst, tok, DataConfig(), train=False)) for lst in (shard_list, tmp_path / "pipes.list")]
    assert [b["keys"] for b in runs[0]] == [b["keys"] for b in runs[1]]
    assert all(torch.equal(a["feats"], b["feats"]) for a, b in zip(*runs))
    assert sum(len(b["keys"]) for b in runs[1]) == len(utts)


def test_wenet_made_shards_read(tmp_path, letters):
    """make_shard_list.py writes KEY.txt then KEY.wav; keys may contain dots."""
    waves = {"spk1-utt.1": tone(1.2, seed=3), "spk2-utt.2": tone(0.8, freq=200, seed=4)}
    members = []
    for key, samples in waves.items():
        members += [(f"{key}.txt", b"HI THERE"), (f"{key}.wav", wav_bytes(samples, 16000))]
    write_tar(tmp_path / "wenet.tar", members)
    batches = _collect(build_dataloader([str(tmp_path / "wenet.tar")], letters, DataConfig(), train=False))
    assert sum(len(b["keys"]) for b in batches) == 2
    batch = batches[0]
    for i, key in enumerate(batch["keys"]):
        wave = torch.from_numpy(waves[key].astype(np.float32) / 32768)[None] * 32768
        ref = torchaudio.compliance.kaldi.fbank(wave, num_mel_bins=80, dither=0.0, energy_floor=0.0)
        n = int(batch["feats_lengths"][i])
        assert n == ref.shape[0]
        torch.testing.assert_close(batch["feats"][i, :n], ref, atol=1e-4, rtol=1e-5)
        assert letters.decode(batch["target"][i, : batch["target_lengths"][i]].tolist()) == "HI THERE"


def test_damaged_input_is_skipped_counted_and_reported(tmp_path, letters, caplog):
    good = wav_bytes(tone(1.0, seed=5), 16000)
    shards = []

    def shard(name, members):
        shards.append(str(write_tar(tmp_path / name, members)))

    shard("good.tar", [("g1.wav", good), ("g1.txt", b"GOOD"), ("g1.json", b"{}")])
    shard("kinds.tar", [
        ("bad_audio.wav", b"RIFF not really audio"), ("bad_audio.txt", b"X"),
        ("no_txt.flac", good),
        ("no_audio.txt", b"ONLY TEXT"),
        ("empty.wav", good), ("empty.txt", b"  \n"),
        ("latin1.wav", good), ("latin1.txt", "CAF\xc9".encode("latin-1")),
        ("unk.wav", good), ("unk.txt", "HELLO ÉÉ".encode()),
        ("rate8k.wav", wav_bytes(tone(1.0, 8000, seed=6), 8000)), ("rate8k.txt", b"EIGHT"),
        ("stereo.wav", wav_bytes(np.stack([tone(0.5, seed=7)] * 2, axis=1), 16000)), ("stereo.txt", b"TWO"),
        ("long.wav", wav_bytes(tone(2.0, seed=8), 16000)), ("long.txt", b"LONG"),
        ("tokens.wav", good), ("tokens.txt", b"A" * 30),
    ])
    whole = write_tar(tmp_path / "whole.tar", [("t1.wav", good), ("t1.txt", b"FIRST"),
                                               ("t2.wav", good), ("t2.txt", b"SECOND")]).read_bytes()
    (tmp_path / "truncated.tar").write_bytes(whole[: len(whole) // 2 + 100])  # inside t2.wav
    shards.append(str(tmp_path / "truncated.tar"))
    (tmp_path / "garbage.tar").write_bytes(b"\x00\x01 definitely not a tar archive" * 10)
    shards += [str(tmp_path / "garbage.tar"), str(tmp_path / "does-not-exist.tar"), "pipe:exit 3"]

    cfg = DataConfig.from_dict({"filter": {"max_frames": 150, "max_tokens": 20}, "batch": {"batch_size": 3}})
    with caplog.at_level(logging.INFO, logger="u2moe.data_prep"):
        loader = build_dataloader(shards, letters, cfg, train=False, num_workers=2)
        batches = _collect(loader)
    delivered = {k: b for b in batches for k in b["keys"]}
    assert set(delivered) == {"g1", "unk", "rate8k", "stereo", "t1"}
    stats = loader.epoch_stats
    assert dict(stats.counts) == {
        "audio_undecodable": 1, "missing_transcript": 1, "missing_audio": 1, "empty_transcript": 1,
        "bad_transcript": 1, "unknown_units": 1, "resampled": 1, "multichannel": 1, "too_long": 1,
        "too_many_tokens": 1, "tar_corrupt": 1, "shard_unreadable": 3,
    }
    assert stats.unknown_unit_count == 2 and stats.utterances == 5 and stats.skipped == 11
    assert stats.examples["tar_corrupt"] == [(str(tmp_path / "truncated.tar"), "t2", stats.examples["tar_corrupt"][0][2])]
    assert stats.examples["audio_undecodable"][0][:2] == (str(tmp_path / "kinds.tar"), "bad_audio")
    unreadable = {shard for shard, _, _ in stats.examples["shard_unreadable"]}
    assert unreadable == {str(tmp_path / "garbage.tar"), str(tmp_path / "does-not-exist.tar"), "pipe:exit 3"}
    # Repaired utterances arrive usable: <unk> in the target, 8 kHz resampled to 16 kHz frames.
    batch = delivered["unk"]
    i = batch["keys"].index("unk")
    assert batch["target"][i, : batch["target_lengths"][i]].tolist().count(letters.unk_id) == 2
    batch = delivered["rate8k"]
    assert int(batch["feats_lengths"][batch["keys"].index("rate8k")]) == 98  # 1 s at 16 kHz
    # The per-epoch summary names the kinds, shards and keys.
    summary = "\n".join(r.getMessage() for r in caplog.records if "data epoch" in r.getMessage())
    assert "tar_corrupt: 1" in summary and "truncated.tar [t2]" in summary and "shard_unreadable: 3" in summary


def test_truncated_audio_is_skipped_and_counted(tmp_path, letters):
    """Opus, FLAC and WAV cut to half their bytes are skipped as audio_truncated; whole ones are kept."""
    opus = shared_corpus("synth-en") / read_kaldi_table(shared_corpus("synth-en") / "dev" / "wav.scp").popitem()[1]
    whole = {"opus": opus.read_bytes()}
    samples, rate = sf.read(opus, dtype="int16")
    whole["flac"] = wav_bytes(samples, rate, "FLAC")
    whole["wav"] = wav_bytes(samples, rate)
    members = []
    for ext, data in whole.items():
        members += [(f"whole_{ext}.{ext}", data), (f"whole_{ext}.txt", b"WHOLE"),
                    (f"cut_{ext}.{ext}", data[: len(data) // 2]), (f"cut_{ext}.txt", b"CUT")]
    loader = build_dataloader([str(write_tar(tmp_path / "cut.tar", members))], letters, DataConfig(), train=False)
    batches = _collect(loader)
    frames = {k: int(n) for b in batches for k, n in zip(b["keys"], b["feats_lengths"])}
    assert set(frames) == {f"whole_{ext}" for ext in whole}
    assert len(set(frames.values())) == 1  # all three hold the whole utterance
    stats = loader.epoch_stats
    assert dict(stats.counts) == {"audio_truncated": 3} and stats.skipped == 3
    assert {key for _, key, _ in stats.examples["audio_truncated"]} == {f"cut_{ext}" for ext in whole}


def test_dynamic_batches_never_exceed_the_budget():
    rng = random.Random(0)
    samples = [Sample(f"u{i}", rng.randint(1, 700), 0.0, [1]) for i in range(500)]
    for budget in (700, 1000, 2500):
        batches = list(dynamic_batches(samples, budget))
        assert [s.key for b in batches for s in b] == [s.key for s in samples]
        assert all(max(s.num_frames for s in b) * len(b) <= budget for b in batches)
        # Greedy: the next utterance would not have fitted.
        for b, nxt in zip(batches, batches[1:]):
            assert max(s.num_frames for s in b + nxt[:1]) * (len(b) + 1) > budget


def test_dynamic_batches_from_the_pipeline(corpus):
    shard_list, tok, utts = corpus
    cfg = DataConfig.from_dict({"batch": {"type": "dynamic", "max_frames_in_batch": 1500},
                                "filter": {"max_frames": 1500}})
    batches = _collect(build_dataloader(shard_list, tok, cfg, train=True, num_workers=0))
    assert sum(len(b["keys"]) for b in batches) == len(utts)
    assert all(b["feats"].shape[0] * b["feats"].shape[1] <= 1500 for b in batches)
    assert any(len(b["keys"]) > 1 for b in batches)


def test_bucket_batches_group_by_padded_length():
    rng = random.Random(0)
    samples = [Sample(f"u{i}", rng.randint(1, 700), 0.0, [1]) for i in range(500)]
    batches = list(bucket_batches(samples, 1000, 50))
    assert sorted(s.key for b, _ in batches for s in b) == sorted(s.key for s in samples)
    for i, (batch, padded) in enumerate(batches):
        # The bucket: the multiple of 50 at or above the longest length, written out; every
        # batch full but the last, so that all of them have their bucket's shape.
        longest = max(s.num_frames for s in batch)
        assert padded % 50 == 0 and padded - 50 < longest <= padded
        assert len(batch) == max(1, 1000 // padded) or (i == len(batches) - 1 and len(batch) < max(1, 1000 // padded))
    # Until the stream ends, a batch holds its bucket's utterances only.
    assert all(padded - 50 < s.num_frames for batch, padded in batches[:len(batches) // 2] for s in batch)


@pytest.mark.parametrize("device_features", [False, True])
def test_bucket_batches_from_the_pipeline_have_the_buckets_shapes(corpus, device_features):
    shard_list, tok, utts = corpus
    cfg = DataConfig.from_dict({"device_features": device_features, "filter": {"max_frames": 1500},
                                "batch": {"type": "bucket", "max_frames_in_batch": 1500,
                                          "bucket_frames": 200, "bucket_tokens": 8}})
    batches = _collect(build_dataloader(shard_list, tok, cfg, train=True, num_workers=0))
    assert sorted(k for b in batches for k in b["keys"]) == sorted(utts)
    fbank = KaldiFbank(cfg.fbank, cfg.sample_rate)
    shapes = set()
    for b in batches:
        if device_features:
            feats, lengths = fbank(b["wavs"], b["wav_lengths"])
            assert torch.equal(lengths, fbank.frame_counts(b["wav_lengths"]))
        else:
            feats, lengths = b["feats"], b["feats_lengths"]
        frames = feats.size(1)
        assert frames % 200 == 0 and frames - 200 < int(lengths.max()) <= frames
        assert (feats[torch.arange(frames)[None, :] >= lengths[:, None]] == 0).all()
        targets = b["target"]
        assert targets.size(1) % 8 == 0 and targets.size(1) - 8 < int(b["target_lengths"].max())
        assert all((targets[i, n:] == IGNORE_ID).all() for i, n in enumerate(b["target_lengths"].tolist()))
        shapes.add(tuple(feats.shape[:2]))
    assert len(shapes) < len(batches)  # shapes repeat: what CUDA graphs replay


def test_device_feature_batches_carry_padded_waveforms(corpus):
    shard_list, tok, utts = corpus
    cfg = DataConfig.from_dict({"device_features": True, "batch": {"batch_size": 4}})
    for batch in _collect(build_dataloader(shard_list, tok, cfg, train=False)):
        assert "feats" not in batch and batch["wavs"].dtype == torch.float32
        for i, key in enumerate(batch["keys"]):
            n = int(batch["wav_lengths"][i])
            ref, _ = sf.read(utts[key][2], dtype="float32")
            assert n == len(ref)
            torch.testing.assert_close(batch["wavs"][i, :n], torch.from_numpy(ref))
            assert (batch["wavs"][i, n:] == 0).all()


def test_config_validation_names_key_and_source():
    cfg = DataConfig.from_dict({"speed_perturb": {"enabled": True, "speeds": [0.9, 1, 1.1]},
                                "fbank": {"dither": 1}}, source="exp.yaml")
    assert cfg.speed_perturb.speeds == (0.9, 1.0, 1.1) and cfg.fbank.dither == 1.0
    with pytest.raises(ConfigError, match=r"exp\.yaml: unknown key 'data\.batch\.bach_size'"):
        DataConfig.from_dict({"batch": {"bach_size": 4}}, source="exp.yaml")
    with pytest.raises(ConfigError, match=r"exp\.yaml: 'data\.batch\.batch_size' must be an integer"):
        DataConfig.from_dict({"batch": {"batch_size": True}}, source="exp.yaml")
    with pytest.raises(ConfigError, match=r"'data\.batch\.type' must be one of"):
        DataConfig.from_dict({"batch": {"type": "buckets"}})
    with pytest.raises(ConfigError, match="fits no batch"):
        DataConfig.from_dict({"batch": {"type": "dynamic", "max_frames_in_batch": 1000}})
    with pytest.raises(ConfigError, match="min_frames"):
        DataConfig.from_dict({"filter": {"min_frames": 0}})
