"""`u2moe prep shards|units|cmvn`: outputs checked against the source files and direct computations."""
from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from test_data_support import (make_kaldi_dir, read_kaldi_table, run_prep, shared_corpus, tone, wav_bytes,
                               write_tar)
from u2moe.data_prep.errors import DataPrepError
from u2moe.data_prep.shard_writer import write_shards
from u2moe.data_prep.tokenizer import Tokenizer


def _tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_shards_keep_original_bytes_transcripts_and_metadata(tmp_path):
    data_dir, utts = make_kaldi_dir(tmp_path / "corpus", count=7)
    assert run_prep(["prep", "shards", "--data-dir", str(data_dir), "--out", str(tmp_path / "shards"),
                     "--utts-per-shard", "3", "--jobs", "2"]) == 0
    listed = (tmp_path / "shards" / "shards.list").read_text().split()
    assert [p.rsplit("/", 1)[1] for p in listed] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    speakers = read_kaldi_table(data_dir / "utt2spk")
    members = {}
    for shard in listed:
        members.update(_tar_members(shard))
    assert len(members) == 3 * len(utts)
    for key, (text, duration, audio_path) in utts.items():
        assert members[f"{key}.opus"] == audio_path.read_bytes()  # no re-encode
        assert members[f"{key}.txt"].decode() == text
        meta = json.loads(members[f"{key}.json"])
        assert meta["speaker"] == speakers[key]
        assert meta["sample_rate"] == 16000
        assert meta["duration"] == pytest.approx(duration, abs=1e-3)


def test_shards_from_segments_pipes_and_data_dir_relative_paths(tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "wavs").mkdir(parents=True)
    rec_a, rec_b = tone(3.0, seed=1), tone(2.0, freq=300, seed=2)
    (data_dir / "wavs" / "a.wav").write_bytes(wav_bytes(rec_a, 16000))  # relative to the data dir
    (tmp_path / "b.flac").write_bytes(wav_bytes(rec_b, 16000, "FLAC"))
    (data_dir / "wav.scp").write_text(f"recA wavs/a.wav\nrecB cat {tmp_path / 'b.flac'} |\n")
    (data_dir / "segments").write_text("s1 recA 0.50 1.25\ns2 recA 2.00 -1\ns3 recB 0.10 0.90\n"
                                       "s4 recB 5.00 6.00\ns5 recZ 0 1\n")
    (data_dir / "text").write_text("s1 ONE\ns2 TWO\ns3 THREE\ns4 FOUR\ns5 FIVE\n")
    summary = write_shards(data_dir, tmp_path / "out")
    assert summary["utterances"] == 3
    assert summary["skipped"] == {"recording_not_in_wav_scp": 1, "bad_audio": 1}
    members = _tar_members(tmp_path / "out" / "shard-000000.tar")
    expected = {"s1": rec_a[8000:20000], "s2": rec_a[32000:], "s3": rec_b[1600:14400]}
    for key, samples in expected.items():
        cut, rate = sf.read(io.BytesIO(members[f"{key}.flac"]), dtype="int16")
        assert rate == 16000
        np.testing.assert_array_equal(cut, samples)  # lossless, sample-exact cut
        assert json.loads(members[f"{key}.json"])["duration"] == pytest.approx(len(samples) / 16000)


def test_whole_file_pipe_entries_keep_their_format(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    flac = wav_bytes(tone(1.0), 16000, "FLAC")
    (tmp_path / "x.flac").write_bytes(flac)
    (data_dir / "wav.scp").write_text(f"u1 cat {tmp_path / 'x.flac'} |\nu2 false |\nu3 {tmp_path / 'missing.wav'}\n")
    (data_dir / "text").write_text("u1 HELLO\nu2 BYE\nu3 GONE\nu4 NO AUDIO\n")
    summary = write_shards(data_dir, tmp_path / "out")
    assert summary["utterances"] == 1
    assert summary["skipped"] == {"bad_audio": 2, "transcript_without_audio": 1}
    assert _tar_members(tmp_path / "out" / "shard-000000.tar")["u1.flac"] == flac


def test_prep_is_idempotent_and_refuses_foreign_output(tmp_path):
    data_dir, _ = make_kaldi_dir(tmp_path / "corpus", count=4)
    out = tmp_path / "shards"
    argv = ["prep", "shards", "--data-dir", str(data_dir), "--out", str(out), "--utts-per-shard", "2"]
    assert run_prep(argv) == 0
    stamp = (out / "shard-000000.tar").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert run_prep(argv) == 0  # finished output recognised
    assert time.perf_counter() - t0 < 1.0
    assert (out / "shard-000000.tar").stat().st_mtime_ns == stamp
    # Other options: refused without --overwrite, replaced with it.
    argv3 = argv[:-1] + ["3"]
    assert run_prep(argv3) == 2
    assert run_prep(argv3 + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert len(_tar_members(out / "shard-000000.tar")) == 9
    # A damaged output (a shard gone) is not taken as finished.
    (out / "shard-000001.tar").unlink()
    with pytest.raises(DataPrepError, match="--overwrite"):
        write_shards(data_dir, out, utts_per_shard=3)
    # A non-empty directory from elsewhere is refused too.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert run_prep(["prep", "shards", "--data-dir", str(data_dir), "--out", str(tmp_path / "other")]) == 2


def test_bpe_units_round_trip_deterministic_and_count_unknowns(tmp_path):
    text = shared_corpus("synth-en") / "train" / "text"
    for out in ("u1", "u2"):
        assert run_prep(["prep", "units", "--text", str(text), "--out", str(tmp_path / out),
                         "--type", "bpe", "--vocab-size", "300"]) == 0
    assert (tmp_path / "u1/units.txt").read_bytes() == (tmp_path / "u2/units.txt").read_bytes()
    assert (tmp_path / "u1/spm.model").read_bytes() == (tmp_path / "u2/spm.model").read_bytes()
    lines = (tmp_path / "u1/units.txt").read_text().splitlines()
    assert lines[:2] == ["<blank> 0", "<unk> 1"] and lines[-1] == f"<sos/eos> {len(lines) - 1}"
    assert [int(l.split()[1]) for l in lines] == list(range(len(lines)))
    tok = pickle.loads(pickle.dumps(Tokenizer.load(tmp_path / "u1")))  # as the loader workers get it
    assert (tok.vocab_size, tok.blank_id, tok.unk_id, tok.sos_eos_id) == (300, 0, 1, 299)
    dev = read_kaldi_table(shared_corpus("synth-en") / "dev" / "text")
    for transcript in list(dev.values())[:100]:
        ids = tok.encode(transcript)
        assert tok.count_unknown(ids) == 0 and all(2 <= i < 299 for i in ids)
        assert tok.decode(ids) == transcript
        assert "".join(tok.tokens(ids)).replace("\u2581", " ").strip() == transcript
    ids = tok.encode("HELLO Ж WORLD")
    assert tok.count_unknown(ids) == 1 and tok.unknown_units("HELLO Ж WORLD") == ["Ж"]
    assert tok.decode(ids) == "HELLO <unk> WORLD"
    assert tok.decode([0] + tok.encode("HELLO") + [299]) == "HELLO"


def test_char_units_for_mandarin_and_mixed_text(tmp_path):
    corpus = shared_corpus("synth-zh")
    assert run_prep(["prep", "units", "--text", str(corpus / "train" / "text"), "--out", str(tmp_path / "u"),
                     "--type", "char"]) == 0
    tok = Tokenizer.load(tmp_path / "u")
    train_chars = {c for t in read_kaldi_table(corpus / "train" / "text").values() for c in t if not c.isspace()}
    assert tok.vocab_size == len(train_chars) + 3
    for transcript in list(read_kaldi_table(corpus / "dev" / "text").values())[:50]:
        ids = tok.encode(transcript)
        assert len(ids) == len(transcript) and tok.count_unknown(ids) == 0
        assert tok.decode(ids) == transcript
    # English inside Mandarin keeps its word spaces; spaces between Chinese characters go.
    mixed = Tokenizer("char", ["<blank>", "<unk>", *"我你好ABC", "\u2581", "<sos/eos>"])
    ids = mixed.encode("我 AB C 你 好")
    assert mixed.tokens(ids) == ["我", "A", "B", "\u2581", "C", "你", "好"]
    assert mixed.decode(ids) == "我AB C你好"
    assert mixed.count_unknown(mixed.encode("我们 ABD")) == 2


def test_cmvn_matches_direct_numpy_computation(tmp_path):
    data_dir, utts = make_kaldi_dir(tmp_path / "corpus", count=5)
    write_shards(data_dir, tmp_path / "shards", utts_per_shard=2)
    shard_list = str(tmp_path / "shards" / "shards.list")
    assert run_prep(["prep", "cmvn", "--shards", shard_list, "--out", str(tmp_path / "cmvn.json"), "--jobs", "2"]) == 0
    assert run_prep(["prep", "cmvn", "--shards", shard_list, "--out", str(tmp_path / "cmvn3.json"),
                     "--max-utts", "3"]) == 0

    feats = []
    for key in sorted(utts):  # shard order is key order
        samples, rate = sf.read(utts[key][2], dtype="float32")
        wave = torch.from_numpy(samples)[None] * 32768
        feats.append(torchaudio.compliance.kaldi.fbank(wave, num_mel_bins=80, frame_length=25, frame_shift=10,
                                                       dither=0.0, energy_floor=0.0,
                                                       sample_frequency=rate).double().numpy())
    for name, used in (("cmvn.json", feats), ("cmvn3.json", feats[:3])):
        stats = json.loads((tmp_path / name).read_text())
        x = np.concatenate(used)
        assert stats["frame_num"] == x.shape[0]
        np.testing.assert_allclose(stats["mean_stat"], x.sum(0), rtol=1e-6)
        np.testing.assert_allclose(stats["var_stat"], (x ** 2).sum(0), rtol=1e-6)

    from u2moe.model.cmvn import load_cmvn

    mean, istd = load_cmvn(tmp_path / "cmvn.json")
    x = np.concatenate(feats)
    np.testing.assert_allclose(mean.numpy(), x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(istd.numpy(), 1 / x.std(0), rtol=1e-4)


def test_cmvn_summary_counts_the_utterances_used_beside_the_skipped(tmp_path, caplog):
    data_dir, utts = make_kaldi_dir(tmp_path / "corpus", count=3)
    write_shards(data_dir, tmp_path / "shards", utts_per_shard=2)
    shard_list = tmp_path / "shards" / "shards.list"
    bad = write_tar(tmp_path / "bad.tar", [("broken.wav", b"RIFF not audio"), ("broken.txt", b"A")])
    shard_list.write_text(shard_list.read_text() + f"{bad}\n")
    with caplog.at_level("WARNING"):
        assert run_prep(["prep", "cmvn", "--shards", str(shard_list), "--out", str(tmp_path / "cmvn.json")]) == 0
    hours = sum(d for _, d, _ in utts.values()) / 3600
    summaries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cmvn input:")]
    assert len(summaries) == 1
    lines = summaries[0].splitlines()
    assert lines[:2] == [f"cmvn input: 3 utterances ({hours:.3f} h); skipped 1", "  skipped audio_undecodable: 1"]


def test_u2moe_command_runs_prep_end_to_end(tmp_path):
    (tmp_path / "text").write_text("a 你好\nb 好的 OK\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "u2moe", "prep", "units", "--text", str(tmp_path / "text"),
           "--out", str(tmp_path / "units"), "--type", "char"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "units" / "units.txt").read_text(encoding="utf-8").split("\n")[2:6] == \
        ["K 2", "O 3", "你 4", "好 5"]
    # Bad input: one error line naming the file, exit code 2, no traceback.
    cmd[cmd.index("--text") + 1] = str(tmp_path / "missing")
    done = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "missing" in done.stderr and "Traceback" not in done.stderr


def test_shards_skip_truncated_audio(tmp_path):
    data_dir, utts = make_kaldi_dir(tmp_path / "corpus", count=3)
    cut = sorted(utts)[1]
    path = utts[cut][2]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    summary = write_shards(data_dir, tmp_path / "shards")
    assert summary["skipped"] == {"audio_truncated": 1} and summary["utterances"] == 2
    assert summary["skipped_examples"][0][:2] == [cut, "audio_truncated"]
    names = _tar_members(tmp_path / "shards" / "shard-000000.tar")
    assert {n.rsplit(".", 1)[0] for n in names} == set(utts) - {cut}


@pytest.mark.parametrize("bad_key", ["../../x", "/etc/x", "a\\b", ".."])
def test_shards_refuse_keys_that_are_paths(tmp_path, caplog, bad_key):
    """Keys become tar member names: one naming a path is refused by file and line, nothing written."""
    data_dir, utts = make_kaldi_dir(tmp_path / "corpus", count=3)
    first = sorted(utts)[1]
    for name in ("wav.scp", "text"):
        table = data_dir / name
        table.write_text(table.read_text(encoding="utf-8").replace(f"{first} ", f"{bad_key} ", 1), encoding="utf-8")
    out = tmp_path / "shards"
    with caplog.at_level("ERROR"):
        assert run_prep(["prep", "shards", "--data-dir", str(data_dir), "--out", str(out)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith(f"{data_dir / 'wav.scp'}:2: key {bad_key!r}")
    assert not out.exists() or not list(out.glob("*.tar"))


def test_shards_reencoded_to_flac_or_wav_hold_the_decoded_original(tmp_path):
    data_dir, utts = make_kaldi_dir(tmp_path / "corpus", count=4)
    out = tmp_path / "flac"
    assert run_prep(["prep", "shards", "--data-dir", str(data_dir), "--out", str(out),
                     "--audio-format", "flac"]) == 0
    summary = json.loads((out / ".done.json").read_text())["summary"]
    assert summary["audio_format"] == "flac" and summary["reencoded"] == {"opus": 4}
    members = _tar_members(out / "shard-000000.tar")
    assert len(members) == 3 * len(utts)
    for key, (_, duration, audio_path) in utts.items():
        decoded, rate = sf.read(audio_path, dtype="float32")
        original = np.clip(np.rint(decoded * 32768), -32768, 32767).astype(np.int16)  # Opus: float decoder
        stored, stored_rate = sf.read(io.BytesIO(members[f"{key}.flac"]), dtype="int16")
        assert sf.info(io.BytesIO(members[f"{key}.flac"])).subtype == "PCM_16"
        assert stored_rate == rate
        np.testing.assert_array_equal(stored, original)  # lossless from the decoded samples
        assert json.loads(members[f"{key}.json"])["duration"] == pytest.approx(len(original) / rate, abs=1e-4)
    # Other format: refused over the FLAC output without --overwrite; WAV holds the same samples.
    assert run_prep(["prep", "shards", "--data-dir", str(data_dir), "--out", str(out), "--audio-format", "wav"]) == 2
    summary = write_shards(data_dir, tmp_path / "wav", audio_format="wav")
    assert summary["reencoded"] == {"opus": 4}
    wav_members = _tar_members(tmp_path / "wav" / "shard-000000.tar")
    for key in utts:
        np.testing.assert_array_equal(sf.read(io.BytesIO(wav_members[f"{key}.wav"]), dtype="int16")[0],
                                      sf.read(io.BytesIO(members[f"{key}.flac"]), dtype="int16")[0])
    # Already-FLAC input is kept byte for byte; "keep" re-encodes nothing.
    again = write_shards(data_dir, tmp_path / "keep")
    assert again["reencoded"] == {} and again["audio_format"] == "keep"


def test_reencoded_shards_feed_the_pipeline_the_same_audio(tmp_path):
    from u2moe.data_prep import DataConfig, build_dataloader
    from test_data_support import LETTERS

    data_dir, utts = make_kaldi_dir(tmp_path / "corpus", count=3)
    cfg = DataConfig.from_dict({"device_features": True})
    waves = {}
    for fmt in ("keep", "flac"):
        write_shards(data_dir, tmp_path / fmt, audio_format=fmt)
        (batch,) = build_dataloader(tmp_path / fmt / "shards.list", Tokenizer("char", LETTERS), cfg, train=False)
        waves[fmt] = {k: batch["wavs"][i, :batch["wav_lengths"][i]] for i, k in enumerate(batch["keys"])}
    for key in utts:
        # The FLAC holds the 16-bit rounding of the decoded Opus: within half a 16-bit step.
        torch.testing.assert_close(waves["flac"][key], waves["keep"][key], atol=0.5 / 32768 + 1e-9, rtol=0)
