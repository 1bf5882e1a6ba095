"""`u2moe transcribe`, `u2moe.load(...).transcribe/.stream` and CTC word times.

References are independent of the code under test: `u2moe decode` (its own reading of a data
dir, batching and scoring), the simulated-streaming search on the whole file's features, known
transcripts of a model trained here to recognise them, and a hand-built CTC path.
"""
from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import u2moe
from decoding_helpers import chirp, tiny_model, units_for
from transcribe_helpers import Trained, train_small_model
from u2moe.__main__ import main
from u2moe.configs.experiment import load_config
from u2moe.data_prep.audio import resample
from u2moe.inference.decoding.data import batch_fbank, decoding_data_config
from u2moe.inference.decoding.search import MODES, DecodeOptions, decode_batch
from u2moe.inference.model_file import load_model_file, save_model_file
from u2moe.inference.word_times import ctc_alignment, word_times


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    return train_small_model(tmp_path_factory.mktemp("transcribe") / "model")


def _run(argv: list[str], capsys, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as done:
        main(argv)
    out, err = capsys.readouterr()
    return done.value.code, out, err


def _data_dir(root: Path, wavs: list[Path], texts: dict[str, str]) -> Path:
    root.mkdir(parents=True)
    (root / "wav.scp").write_text("".join(f"{w.stem} {w}\n" for w in wavs))
    (root / "text").write_text("".join(f"{k} {t}\n" for k, t in texts.items()))
    return root


def test_ctc_alignment_and_word_times_follow_a_hand_built_path():
    # Units: 0 blank, 1 A, 2 B, 3 word boundary. Path over 10 frames: _ A A _ B _ | _ B B _
    units = ["<blank>", "A", "B", "\u2581", "<sos/eos>"]
    path = [0, 1, 1, 0, 2, 0, 3, 0, 2, 2]
    log_probs = torch.full((len(path), len(units)), math.log(0.01))
    log_probs[torch.arange(len(path)), torch.tensor(path)] = math.log(0.96)
    ids = [1, 2, 3, 2]
    spans = ctc_alignment(log_probs, ids, blank=0)
    assert spans == [(1, 2), (4, 4), (6, 6), (8, 9)]
    words = word_times(units, ids, spans, frame_seconds=0.04, duration=0.39)
    assert [(w.word, round(w.start, 2), round(w.end, 2)) for w in words] == [("AB", 0.04, 0.2), ("B", 0.32, 0.39)]
    # Two equal units in a row need a blank between them: 3 frames cannot hold A A.
    assert ctc_alignment(log_probs[:2], [1, 1], blank=0) is None


def test_the_model_recognises_its_utterances_and_api_and_command_equal_decode_in_every_mode(
        trained, tmp_path, capsys):
    wavs = sorted(trained.texts)
    data = _data_dir(tmp_path / "data", wavs, {w.stem: t for w, t in trained.texts.items()})
    assert _run(["decode", "--model", str(trained.model_file), "--data-dir", str(data), "--modes", ",".join(MODES),
                 "--batch-size", "3", "--beam", "4", "--out", str(tmp_path / "decoded")], capsys)[0] == 0
    decoded = {m: dict(line.split(" ", 1) for line in (tmp_path / "decoded" / f"{m}.txt").read_text().splitlines())
               for m in MODES}
    assert decoded["attention_rescoring"] == {w.stem: t for w, t in trained.texts.items()}
    for mode in MODES:
        asr = u2moe.load(trained.model_file, mode=mode, beam=4, batch_size=2)
        assert [r.text for r in asr.transcribe(wavs)] == [decoded[mode][w.stem] for w in wavs], mode
        code, out, _ = _run(["transcribe", "--model", str(trained.model_file), "--mode", mode, "--beam", "4",
                             "--format", "json", str(wavs[0].parent)], capsys)
        assert code == 0
        lines = [json.loads(line) for line in out.splitlines()]
        assert {Path(j["path"]).stem: j["text"] for j in lines} == decoded[mode]
        assert all(j["mode"] == mode for j in lines)


def test_chunked_command_equals_chunked_decode(trained, tmp_path, capsys):
    wavs = sorted(trained.texts)
    data = _data_dir(tmp_path / "data", wavs, {w.stem: t for w, t in trained.texts.items()})
    chunking = ["--chunk-size", "8", "--left-chunks", "2", "--beam", "4"]
    assert _run(["decode", "--model", str(trained.model_file), "--data-dir", str(data), "--modes",
                 "attention_rescoring", *chunking, "--out", str(tmp_path / "decoded")], capsys)[0] == 0
    decoded = (tmp_path / "decoded" / "attention_rescoring.txt").read_text().splitlines()
    code, out, _ = _run(["transcribe", "--model", str(trained.model_file), *chunking, *map(str, wavs)], capsys)
    assert code == 0
    assert [line.split("\t") for line in out.splitlines()] == [
        [str(w), line.split(" ", 1)[1]] for w, line in zip(wavs, decoded)]


def test_stream_final_equals_chunked_decoding_and_partials_only_grow(trained, capsys):
    model, config, units = load_model_file(trained.model_file)
    cfg = decoding_data_config(config)
    wave = torch.from_numpy(sf.read(trained.joined, dtype="float32")[0])
    feats, lengths = batch_fbank([wave], cfg)
    expected = decode_batch(model, feats, lengths, ["attention_rescoring"],
                            DecodeOptions(beam=4, chunk_size=8, left_chunks=2))["attention_rescoring"][0]
    expected_text = "".join(units[i] for i in expected).replace("\u2581", " ").strip()
    stream = u2moe.load(trained.model_file, beam=4).stream(chunk_size=8, left_chunks=2)
    partials = [stream.accept(piece.numpy()) for piece in wave.split(1234)]
    result = stream.finish()
    assert result.text == expected_text
    assert partials[-1] and all(b.startswith(a) for a, b in zip(partials, partials[1:]))

    code, out, _ = _run(["transcribe", "--model", str(trained.model_file), "--stream", "--chunk-size", "8",
                         "--left-chunks", "2", "--beam", "4", str(trained.joined)], capsys)
    assert code == 0
    lines = [line.split("\t") for line in out.splitlines()]
    shown = [text for _, kind, text in lines[:-1]]
    assert all(kind == "partial" for _, kind, _ in lines[:-1]) and len(shown) > 2
    assert all(b.startswith(a) and b != a for a, b in zip(shown, shown[1:]))
    assert lines[-1] == [str(trained.joined), expected_text]


def test_resampled_and_stereo_copies_give_the_original_text(trained, tmp_path):
    asr = u2moe.load(trained.model_file, beam=4)
    for path, text in trained.texts.items():
        if path == trained.joined:
            continue
        wave = torch.from_numpy(sf.read(path, dtype="float32")[0])
        assert asr.transcribe(path).text == text  # the model gets the original right
        narrow = tmp_path / f"{path.stem}-8k.wav"
        sf.write(narrow, resample(wave, 16000, 8000).numpy(), 8000, subtype="PCM_16")
        wide = resample(wave, 16000, 44100)
        stereo = tmp_path / f"{path.stem}-44k.flac"
        sf.write(stereo, torch.stack([wide, 0.5 * wide], dim=1).numpy(), 44100)
        assert [r.text for r in asr.transcribe([narrow, stereo])] == [text, text], path.name
        # The same from samples in memory: channels first, and 16-bit integers.
        assert asr.transcribe(torch.stack([wide, 0.5 * wide]), sample_rate=44100).text == text
        assert asr.transcribe((wave * 32767).round().to(torch.int16).numpy(), sample_rate=16000).text == text


def test_word_times_are_ordered_inside_the_audio_and_split_at_the_silence(trained):
    first, second = (text.split() for text in trained.joined_texts)
    result = u2moe.load(trained.model_file, beam=4).transcribe(trained.joined)
    assert [w.word for w in result.words] == first + second == result.text.split()
    assert all(0 <= w.start < w.end <= result.duration for w in result.words)
    assert all(a.end <= b.start for a, b in zip(result.words, result.words[1:]))
    before, after = result.words[:len(first)], result.words[len(first):]
    assert max(w.end for w in before) <= trained.joined_split + 0.04  # one encoder frame
    assert min(w.start for w in after) >= max(w.end for w in before)


def test_command_reports_each_unreadable_file_and_transcribes_the_rest(tmp_path, capsys, monkeypatch):
    cfg = load_config("tiny_dense")
    save_model_file(tmp_path / "model.pt", tiny_model("tiny_dense"), cfg, units_for(cfg.model.vocab_size))
    folder = tmp_path / "audio"
    (folder / "sub").mkdir(parents=True)
    sf.write(folder / "sub" / "good.flac", chirp(0.8, 0).numpy(), 16000)
    sf.write(tmp_path / "listed.wav", chirp(0.5, 1).numpy(), 22050)
    (folder / "empty.wav").write_bytes(b"")
    (folder / "broken.wav").write_bytes(b"RIFF not audio at all")
    sf.write(folder / "short.wav", np.zeros(80, dtype=np.float32), 16000)
    (folder / "notes.txt").write_text("not audio: not searched")
    code, out, err = _run(["transcribe", "--model", str(tmp_path / "model.pt"), "--mode", "ctc_greedy",
                           str(folder), "-", str(tmp_path / "missing.wav")], capsys,
                          stdin=f"{tmp_path / 'listed.wav'}\n", monkeypatch=monkeypatch)
    assert code == 1
    assert [line.split("\t")[0] for line in out.splitlines()] == [str(folder / "sub" / "good.flac"),
                                                                   str(tmp_path / "listed.wav")]
    problems = [line for line in err.splitlines() if line.startswith("u2moe transcribe: ")]
    assert len(problems) == 4
    for name in ("empty.wav", "broken.wav", "short.wav", "missing.wav"):
        assert sum(name in line for line in problems) == 1, name
    assert "6/6" in err  # the progress bar over the files named or found
