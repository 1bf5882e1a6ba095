"""A small model that really recognises a few synth-en utterances, for the transcription tests.

Trained here in plain PyTorch (no trainer, no DeepSpeed; deterministic on the CPU) until
attention rescoring gets every training utterance right: the tests then check transcription against
known transcripts, not only against other code paths.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import soundfile as sf
import torch

from test_data_support import LETTERS, read_kaldi_table, shared_corpus
from u2moe.configs.data import DataConfig
from u2moe.configs.experiment import load_config
from u2moe.data_prep.audio import resample
from u2moe.data_prep.tokenizer import Tokenizer
from u2moe.inference.decoding.search import DecodeOptions, decode_batch
from u2moe.inference.decoding.data import batch_fbank
from u2moe.inference.model_file import save_model_file
from u2moe.model import U2Model
from u2moe.model.cmvn import GlobalCMVN
from u2moe.model.label_smoothing import IGNORE_ID

# Short utterances of one synthetic voice.
KEYS = ["mbrola_en1-train_00734", "mbrola_en1-train_00468", "mbrola_en1-train_00502"]
SMALL = ["model.encoder.output_size=64", "model.encoder.attention_heads=2", "model.encoder.num_blocks=2",
         "model.encoder.ffn.hidden_units=192", "model.decoder.attention_heads=2", "model.decoder.ffn.hidden_units=192",
         f"model.vocab_size={len(LETTERS)}"]
RATE = 16000


@dataclass
class Trained:
    model_file: Path
    texts: dict[Path, str]  # 16 kHz mono wav -> transcript, for every file below
    joined: Path  # two of the utterances with one second of near-silence between them
    joined_texts: tuple[str, str]  # their transcripts, in order
    joined_split: float  # where the silence starts, in seconds


def _read(path: Path) -> torch.Tensor:
    return torch.from_numpy(sf.read(path, dtype="float32")[0])


def _texts(model: U2Model, feats: torch.Tensor, lengths: torch.Tensor, tok: Tokenizer) -> list[str]:
    """What the tests' default mode (attention rescoring) decodes."""
    model.eval()
    hyps = decode_batch(model, feats, lengths, ["attention_rescoring"], DecodeOptions(beam=4))
    return [tok.decode(h) for h in hyps["attention_rescoring"]]


def train_small_model(root: Path, max_steps: int = 300) -> Trained:
    corpus = shared_corpus("synth-en")
    texts, wavs = read_kaldi_table(corpus / "train" / "text"), read_kaldi_table(corpus / "train" / "wav.scp")
    root.mkdir(parents=True, exist_ok=True)
    files: dict[Path, str] = {}
    waves = []
    for key in KEYS:
        wave = _read(corpus / wavs[key])
        path = root / f"{key}.wav"
        sf.write(path, wave.numpy(), RATE)
        files[path] = texts[key]
        waves.append(wave)
    gap = 0.001 * torch.randn(RATE, generator=torch.Generator().manual_seed(0))
    joined_wave = torch.cat([waves[0], gap, waves[1]])
    joined = root / "joined.wav"
    sf.write(joined, joined_wave.numpy(), RATE)
    files[joined] = f"{texts[KEYS[0]]} {texts[KEYS[1]]}"
    # Narrow-band copies (through 8 kHz) too, so that 8 kHz recordings are recognised as well.
    narrow = [resample(resample(w, RATE, 8000), 8000, RATE) for w in waves]
    train_waves = [*waves, joined_wave, *narrow]
    train_texts = [*files.values(), *(texts[k] for k in KEYS)]

    cfg = load_config("tiny_dense", SMALL)
    data_cfg = DataConfig()
    feats, lengths = batch_fbank(train_waves, data_cfg)
    frames = torch.cat([f[:n] for f, n in zip(feats, lengths)])
    torch.manual_seed(0)
    model = U2Model(cfg.model, GlobalCMVN(frames.mean(0), 1 / frames.std(0).clamp(min=1e-3)))
    tok = Tokenizer("char", LETTERS)
    ids = [tok.encode(t) for t in train_texts]
    target = torch.nn.utils.rnn.pad_sequence([torch.tensor(i) for i in ids], batch_first=True, padding_value=IGNORE_ID)
    target_lengths = torch.tensor([len(i) for i in ids])
    opt = torch.optim.Adam(model.parameters(), lr=4e-3)
    for step in range(1, max_steps + 1):
        model.train()
        loss = model(feats, lengths, target, target_lengths)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 and _texts(model, feats, lengths, tok) == train_texts:
            break
    else:
        raise AssertionError(f"not memorised in {max_steps} steps: {_texts(model, feats, lengths, tok)}")
    model.eval()
    save_model_file(root / "model.pt", model, cfg, LETTERS)
    return Trained(root / "model.pt", files, joined, (texts[KEYS[0]], texts[KEYS[1]]), len(waves[0]) / RATE)
