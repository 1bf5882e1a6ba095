"""`u2moe decode`: decode a shard list or data dir with a model file, write and score hypotheses."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from ...data_prep.batching import static_batches
from ...data_prep.errors import DataPrepError
from ...data_prep.progress_bar import progress_bar
from ...data_prep.stats import DataStats
from ...data_prep.tokenizer import Tokenizer
from ..model_file import load_model_file
from .arguments import options, stream_graphs
from .data import batch_fbank, decoding_data_config, read_utterances
from .device import model_dtype, prepare_model
from .scoring import score
from .search import check_modes, decode_batch

logger = logging.getLogger("u2moe.decode")


def run_decode(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    modes = check_modes(args.modes.split(","))
    model, config, units = load_model_file(args.model)
    model = prepare_model(model, args.device, args.dtype)
    dtype = model_dtype(model)
    tokenizer = Tokenizer("char", units)  # units are fixed; decoding only joins them into text
    data_cfg = decoding_data_config(config, source=f"{args.model}:config")
    opts = options(args)
    graphs = stream_graphs(args, model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats = DataStats()
    refs: list[str] = []
    hyps: dict[str, list[str]] = {m: [] for m in modes}
    files = {m: open(out / f"{m}.txt", "w", encoding="utf-8") for m in modes}
    start = time.perf_counter()
    try:
        utts = read_utterances(data_cfg, stats, shards=args.shards, data_dir=args.data_dir)
        for batch in static_batches(progress_bar(utts, "decode", unit="utt"), args.batch_size):
            feats, lengths = batch_fbank([u.wave for u in batch], data_cfg, args.device)
            result = decode_batch(model, feats.to(dtype), lengths, modes, opts, graphs)
            for m in modes:
                for utt, ids in zip(batch, result[m]):
                    text = tokenizer.decode(ids)
                    files[m].write(f"{utt.key} {text}\n")
                    hyps[m].append(text)
            refs.extend(u.text for u in batch)
            stats.utterances += len(batch)
            stats.audio_seconds += sum(u.duration for u in batch)
            stats.batches += 1
    finally:
        for f in files.values():
            f.close()
    elapsed = time.perf_counter() - start
    if stats.skipped:
        logger.warning(stats.summary("decode input"))
    scored = [i for i, r in enumerate(refs) if r]
    if len(scored) < len(refs):
        print(f"scored {len(scored)} of {len(refs)} utterances: {len(refs) - len(scored)} have no reference "
              f"text (decoded and written, not scored)")
    report = {}
    for m in modes:
        s = score([refs[i] for i in scored], [hyps[m][i] for i in scored])
        report[m] = s.to_dict()
        print(s.line(m))
    (out / "wer.json").write_text(json.dumps(report, indent=1) + "\n")
    logger.info("%d utterances, %.1f s of audio in %.1f s (all modes together)",
                stats.utterances, stats.audio_seconds, elapsed)
    return 0


def decode_handler(args: argparse.Namespace) -> int:
    try:
        return run_decode(args)
    except (ValueError, DataPrepError, OSError) as err:
        logger.error("%s", err)
        return 2
