"""The text <-> unit-id mapping shared by training and decoding.

A units directory (written by `u2moe prep units`) holds `units.txt` in WeNet's format
(`token id` lines, `<blank> 0`, `<unk> 1`, ..., `<sos/eos>` last), `tokenizer.json` naming the
type, and for bpe/unigram the sentencepiece model `spm.model`. Ids always come from units.txt,
so a WeNet-made units file with its own sentencepiece model works too (without tokenizer.json the
type is inferred: a `*.model` file present means sentencepiece, otherwise characters).

Character units split every non-space character; a space survives as the unit "▁" only between
two non-CJK characters (English words inside Mandarin text keep their word boundary, while
spaces between Chinese characters -- often arbitrary segmentation -- are dropped).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import DataPrepError

UNITS_FILE = "units.txt"
META_FILE = "tokenizer.json"
SPM_MODEL = "spm.model"
BLANK, UNK, SOS_EOS = "<blank>", "<unk>", "<sos/eos>"
SPACE = "\u2581"  # sentencepiece's word-boundary mark, reused as the char-level space unit
TYPES = ("bpe", "unigram", "char")

# Han, kana, hangul, CJK punctuation and full-width forms: scripts written without spaces.
_CJK = re.compile("[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
                  "\uf900-\ufaff\uff00-\uffef\U00020000-\U0002ffff]")


def char_units(text: str) -> list[str]:
    """Character units of a transcript (see the module docstring for spaces)."""
    units: list[str] = []
    words = text.split()
    for i, word in enumerate(words):
        if i and not _CJK.match(words[i - 1][-1]) and not _CJK.match(word[0]):
            units.append(SPACE)
        units.extend(word)
    return units


def read_units(path: Path) -> list[str]:
    """Tokens by id from units.txt, checking WeNet's conventions; errors name file:line."""
    tokens: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split()
            if len(fields) != 2 or not fields[1].isdigit():
                raise DataPrepError(f"{path}:{lineno}: expected 'token id', got {line.rstrip()!r}")
            if int(fields[1]) != len(tokens):
                raise DataPrepError(f"{path}:{lineno}: id {fields[1]} out of sequence (expected {len(tokens)})")
            tokens.append(fields[0])
    if len(tokens) < 3 or tokens[0] != BLANK or tokens[-1] != SOS_EOS or UNK not in tokens:
        raise DataPrepError(f"{path}: needs {BLANK} as id 0, an {UNK}, and {SOS_EOS} as the last id")
    return tokens


class Tokenizer:
    def __init__(self, kind: str, tokens: list[str], spm_model: bytes | None = None):
        if kind not in TYPES:
            raise ValueError(f"tokenizer type must be one of {TYPES}, got {kind!r}")
        if (kind == "char") != (spm_model is None):
            raise ValueError("bpe/unigram tokenizers need a sentencepiece model, char ones none")
        self.kind = kind
        self._tokens = tokens
        self._ids = {tok: i for i, tok in enumerate(tokens)}
        self._spm_model = spm_model
        self._sp = self._load_spm(spm_model)

    @staticmethod
    def _load_spm(model: bytes | None) -> Any:
        if model is None:
            return None
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_proto=model)

    @classmethod
    def load(cls, units_dir: str | Path) -> "Tokenizer":
        units_dir = Path(units_dir)
        tokens = read_units(units_dir / UNITS_FILE)
        meta_path = units_dir / META_FILE
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            kind, model_name = meta["type"], meta.get("spm_model")
        else:
            models = sorted(units_dir.glob("*.model"))
            kind, model_name = ("bpe", models[0].name) if models else ("char", None)
        model = (units_dir / model_name).read_bytes() if model_name else None
        return cls(kind, tokens, model)

    # Data-loader workers receive the tokenizer by pickling; the processor is rebuilt there.
    def __getstate__(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokens": self._tokens, "spm_model": self._spm_model}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["kind"], state["tokens"], state["spm_model"])

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def blank_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return self._ids[UNK]

    @property
    def sos_eos_id(self) -> int:
        return len(self._tokens) - 1

    def units(self, text: str) -> list[str]:
        """The transcript as unit strings, before the lookup in units.txt."""
        if self._sp is None:
            return char_units(text)
        return self._sp.encode(text, out_type=str)

    def encode(self, text: str) -> list[int]:
        """Unit ids; units missing from the table become unk_id (count them with count_unknown)."""
        unk = self.unk_id
        return [self._ids.get(u, unk) for u in self.units(text)]

    def count_unknown(self, ids: list[int]) -> int:
        return sum(1 for i in ids if i == self.unk_id)

    def unknown_units(self, text: str) -> list[str]:
        """The units of `text` that the table lacks (for reports; slower than encode)."""
        return [u for u in self.units(text) if u not in self._ids]

    def tokens(self, ids: list[int]) -> list[str]:
        return [self._tokens[i] for i in ids]

    def decode(self, ids: list[int]) -> str:
        """Text from ids; blank and <sos/eos> are dropped, unknown units print as <unk>."""
        special = (self.blank_id, self.sos_eos_id)
        pieces = self.tokens([i for i in ids if i not in special])
        if self._sp is not None:
            return self._sp.decode_pieces(pieces)
        return "".join(pieces).replace(SPACE, " ").strip()
