"""`u2moe prep units`: train the unit inventory from a Kaldi `text` file.

bpe/unigram: a sentencepiece model trained deterministically (one thread, no sampling or
shuffling of the input, identity normalisation so transcripts -- upper case included -- are kept
exactly). Sentencepiece itself reserves id 0 for `<blank>` (as its pad piece) and id 1 for `<unk>`,
so units.txt ids equal sentencepiece ids; `<sos/eos>` is appended last.
char: every character seen (see tokenizer.char_units), sorted by code point.
`vocab_size` is the size of the whole table, specials included (the model's output layer); for
char it keeps only the most frequent characters, and by default all of them.
"""
from __future__ import annotations

import io
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from .done_marker import PreparedOutput, fingerprint
from .errors import DataPrepError
from .tokenizer import BLANK, META_FILE, SOS_EOS, SPM_MODEL, TYPES, UNITS_FILE, UNK, Tokenizer, char_units

logger = logging.getLogger(__name__)


def read_transcripts(text_file: Path) -> list[str]:
    """Transcripts of a Kaldi text file (key, then the transcript); empty ones are left out."""
    transcripts = []
    with open(text_file, encoding="utf-8") as f:
        for line in f:
            fields = line.strip().split(maxsplit=1)
            if len(fields) == 2:
                transcripts.append(fields[1])
    if not transcripts:
        raise DataPrepError(f"{text_file}: no transcripts (expected 'key transcript' lines)")
    return transcripts


def _train_spm(transcripts: list[str], kind: str, vocab_size: int) -> bytes:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(transcripts),
        model_writer=model,
        model_type=kind,
        vocab_size=vocab_size - 1,  # + <sos/eos>
        character_coverage=1.0,
        normalization_rule_name="identity",
        pad_id=0, pad_piece=BLANK, unk_id=1, unk_piece=UNK, bos_id=-1, eos_id=-1,
        unk_surface=UNK,
        # Determinism: the same text gives the same model.
        num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
        # Small corpora may not support the requested size; take what they give and report it.
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model.getvalue()


def train_units(text_file: str | Path, out: str | Path, kind: str, vocab_size: int | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    text_file, out = Path(text_file), Path(out)
    if kind not in TYPES:
        raise DataPrepError(f"--type must be one of {TYPES}, got {kind!r}")
    if kind != "char" and vocab_size is None:
        raise DataPrepError(f"--vocab-size is required for --type {kind}")
    if vocab_size is not None and vocab_size < 4:
        raise DataPrepError("--vocab-size must be at least 4 (three specials and one unit)")
    fp = fingerprint({"command": "units", "type": kind, "vocab_size": vocab_size}, content_files=[text_file])
    target = PreparedOutput(out, owned=(UNITS_FILE, SPM_MODEL, META_FILE))
    done = target.make_room(fp, overwrite)
    if done is not None:
        logger.info("%s is up to date (%s units); nothing to do", out, done.get("vocab_size"))
        return done

    transcripts = read_transcripts(text_file)
    outputs = [out / UNITS_FILE, out / META_FILE]
    if kind == "char":
        counts = Counter(u for t in transcripts for u in char_units(t))
        keep = counts if vocab_size is None else dict(
            sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: vocab_size - 3])
        tokens = [BLANK, UNK, *sorted(keep), SOS_EOS]
        meta: dict[str, Any] = {"type": kind}
    else:
        model = _train_spm(transcripts, kind, vocab_size)
        (out / SPM_MODEL).write_bytes(model)
        outputs.append(out / SPM_MODEL)
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_proto=model)
        tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())] + [SOS_EOS]
        meta = {"type": kind, "spm_model": SPM_MODEL}
    (out / UNITS_FILE).write_text("".join(f"{tok} {i}\n" for i, tok in enumerate(tokens)), encoding="utf-8")
    (out / META_FILE).write_text(json.dumps(meta) + "\n")

    tokenizer = Tokenizer.load(out)
    unknown = sum(tokenizer.count_unknown(tokenizer.encode(t)) for t in transcripts)
    summary = {"type": kind, "vocab_size": tokenizer.vocab_size, "transcripts": len(transcripts),
               "unknown_units_in_training_text": unknown}
    if vocab_size is not None and tokenizer.vocab_size != vocab_size:
        logger.warning("asked for %d units, the text supports %d", vocab_size, tokenizer.vocab_size)
    target.mark_done(fp, outputs, summary)
    logger.info("wrote %d %s units to %s (%d transcripts; %d units of them map to <unk>)",
                tokenizer.vocab_size, kind, out, len(transcripts), unknown)
    return summary
