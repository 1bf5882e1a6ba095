"""`u2moe prep shards|units|cmvn`: data preparation commands.

Every command is idempotent (see done_marker.py): rerunning it on unchanged inputs returns at
once, and a non-empty output from other inputs is refused unless --overwrite is given.
"""
from __future__ import annotations

import argparse
import logging

import yaml

from ..configs.data import DataConfig
from .cmvn import compute_cmvn
from .errors import DataPrepError
from .shard_writer import write_shards
from .units import train_units


def register(subparsers: argparse._SubParsersAction) -> None:
    prep = subparsers.add_parser("prep", help="prepare data: tar shards, units, CMVN statistics")
    sub = prep.add_subparsers(dest="prep_command", required=True, metavar="STEP")

    shards = sub.add_parser("shards", help="Kaldi data dir -> webdataset tar shards + shards.list")
    shards.add_argument("--data-dir", required=True, help="Kaldi dir with wav.scp, text [, segments, utt2spk]")
    shards.add_argument("--out", required=True, help="output directory")
    shards.add_argument("--utts-per-shard", type=int, default=1000)
    shards.add_argument("--jobs", type=int, default=1, help="shards written in parallel")
    shards.add_argument("--audio-format", choices=("keep", "flac", "wav"), default="keep",
                        help="keep: original bytes (default); flac/wav: re-encode what is not in that "
                             "format, for faster decoding in training at the cost of disk")
    shards.set_defaults(handler=_shards)

    units = sub.add_parser("units", help="train units (sentencepiece bpe/unigram, or characters)")
    units.add_argument("--text", required=True, help="Kaldi text file (key transcript)")
    units.add_argument("--out", required=True, help="output directory (units.txt, tokenizer.json, spm.model)")
    units.add_argument("--type", required=True, choices=("bpe", "unigram", "char"))
    units.add_argument("--vocab-size", type=int, default=None,
                       help="size of the unit table incl. <blank>, <unk>, <sos/eos> (required for bpe/unigram)")
    units.set_defaults(handler=_units)

    cmvn = sub.add_parser("cmvn", help="global fbank mean/variance in WeNet's global_cmvn JSON format")
    cmvn.add_argument("--shards", required=True, help="shard list file")
    cmvn.add_argument("--out", required=True, help="output JSON file")
    cmvn.add_argument("--max-utts", type=int, default=None, help="use only the first N utterances")
    cmvn.add_argument("--config", default=None, help="trainer yaml whose `data:` section sets fbank options")
    cmvn.add_argument("--jobs", type=int, default=1)
    cmvn.set_defaults(handler=_cmvn)

    for parser in (shards, units, cmvn):
        parser.add_argument("--overwrite", action="store_true", help="replace existing output")


def _run(func, *args, **kwargs) -> int:
    """Run a preparation step: user errors print one line and give exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        func(*args, **kwargs)
    except (DataPrepError, OSError) as err:
        logging.getLogger("u2moe.prep").error("%s", err)
        return 2
    return 0


def _shards(args: argparse.Namespace) -> int:
    return _run(write_shards, args.data_dir, args.out, utts_per_shard=args.utts_per_shard,
                jobs=args.jobs, overwrite=args.overwrite, audio_format=args.audio_format)


def _units(args: argparse.Namespace) -> int:
    return _run(train_units, args.text, args.out, args.type, vocab_size=args.vocab_size,
                overwrite=args.overwrite)


def _cmvn(args: argparse.Namespace) -> int:
    cfg = None
    if args.config:
        with open(args.config) as f:
            cfg = DataConfig.from_dict((yaml.safe_load(f) or {}).get("data"), source=args.config)
    return _run(compute_cmvn, args.shards, args.out, cfg, max_utts=args.max_utts, jobs=args.jobs,
                overwrite=args.overwrite)
