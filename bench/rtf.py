"""`u2moe bench rtf`: real-time factor of decoding real audio with each preset, in one run.

RTF = decode wall time / audio duration, per preset and mode; the time covers fbank, encoder
(full context, or chunk by chunk with caches) and the mode's search, as a deployment runtime
does them; reading and decoding the audio files is excluded. Weights are untrained (timing does
not depend on their values), so CTC yields meaningless hypotheses and the decoder's own `<eos>`
means nothing: attention rescoring is therefore run on `beam` hypotheses as long as each
reference transcript in units, and the attention beam search is capped at that length, which
makes the decoders' share of the cost real and the same for every preset.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch

from ..configs.experiment import load_config
from ..configs.loading import ConfigError
from ..data_prep.batching import static_batches
from ..data_prep.errors import DataPrepError
from ..data_prep.stats import DataStats
from ..data_prep.tokenizer import Tokenizer, char_units
from ..inference.decoding.attention_beam import attention_beam_search
from ..inference.decoding.arguments import add_decoding_arguments, add_input_arguments, options, stream_graphs
from ..inference.decoding.ctc_greedy import ctc_greedy_search
from ..inference.decoding.ctc_prefix_beam import ctc_prefix_beam_search
from ..inference.decoding.data import batch_fbank, decoding_data_config, read_utterances
from ..inference.decoding.device import model_dtype, prepare_model
from ..inference.decoding.rescoring import attention_rescoring
from ..inference.decoding.search import check_modes, encode
from ..model.asr_model import U2Model
from .handler import logged_run

logger = logging.getLogger("u2moe.bench.rtf")

BENCH_MODES = ("ctc_greedy", "attention_rescoring")  # the default --modes; any of the four may be asked for


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rtf", help="decoding real-time factor of presets on real audio")
    p.add_argument("--configs", default="dense_225m,moe_1b,dense_1b", help="comma-separated presets or yaml paths")
    add_input_arguments(p)
    add_decoding_arguments(p, default_modes=",".join(BENCH_MODES))
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--utts", type=int, default=20, help="utterances timed per preset (after one warm-up)")
    p.add_argument("--repeats", type=int, default=1, help="time the utterances this many times and report "
                   "the median (GPUs: > 1, as the first pass also loads kernels for new shapes)")
    p.add_argument("--units", default=None, help="units dir (u2moe prep units) to count reference tokens; "
                   "default: character units of the transcript")
    p.add_argument("--json", default=None, help="also write {preset: {mode: {rtf, ratio}}} here")
    p.set_defaults(handler=logged_run(run_rtf, logger, (ValueError, ConfigError, DataPrepError, OSError)))


def _reference_lengths(texts: list[str], units_dir: str | None) -> list[int]:
    if units_dir is None:
        return [len(char_units(t)) for t in texts]
    tokenizer = Tokenizer.load(units_dir)
    return [len(tokenizer.encode(t)) for t in texts]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_rtf(args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    torch.set_num_threads(args.threads)
    modes = check_modes(args.modes.split(","))
    presets = args.configs.split(",")
    opts = options(args)
    data_cfg = decoding_data_config(None)
    stats = DataStats()
    # One warm-up batch, then the timed ones; audio is decoded once, outside every timing.
    utts = list(read_utterances(data_cfg, stats, shards=args.shards, data_dir=args.data_dir,
                                limit=args.utts + args.batch_size))
    if len(utts) <= args.batch_size:
        raise ValueError(f"need more than {args.batch_size} readable utterances, got {len(utts)}")
    ref_lengths = dict(zip((u.key for u in utts), _reference_lengths([u.text for u in utts], args.units)))
    groups = list(static_batches(iter(utts), args.batch_size))
    warmup, timed = groups[0], groups[1:]
    audio_seconds = sum(u.duration for g in timed for u in g)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for preset in presets:
        cfg = load_config(preset).model
        torch.manual_seed(0)
        model = prepare_model(U2Model(cfg), args.device, args.dtype)
        graphs = stream_graphs(args, model)
        results[preset] = {}
        for mode in modes:
            _decode_group(model, warmup, mode, opts, graphs, data_cfg, ref_lengths, args.device)
            passes = []
            for _ in range(args.repeats):
                _sync(args.device)
                start = time.perf_counter()
                for group in timed:
                    _decode_group(model, group, mode, opts, graphs, data_cfg, ref_lengths, args.device)
                _sync(args.device)
                passes.append((time.perf_counter() - start) / audio_seconds)
            rtf = statistics.median(passes)
            results[preset][mode] = {"rtf": rtf}
            logger.info("%s %s: RTF %.4f", preset, mode, rtf)
        del model, graphs
    baseline = "dense_225m" if "dense_225m" in results else presets[0]
    for preset in presets:
        for mode in modes:
            results[preset][mode]["ratio"] = results[preset][mode]["rtf"] / results[baseline][mode]["rtf"]
    _print_table(results, modes, baseline, len([u for g in timed for u in g]), audio_seconds, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
    return results


@torch.inference_mode()
def _decode_group(model, group, mode: str, opts, graphs, data_cfg, ref_lengths: dict[str, int], device: str
                  ) -> None:
    feats, lengths = batch_fbank([u.wave for u in group], data_cfg, device)
    memory, valid = encode(model, feats.to(model_dtype(model)), lengths, opts, graphs)
    out_lengths = valid.sum(dim=1)
    log_probs = model.ctc.log_softmax(memory)
    if mode == "ctc_greedy":
        ctc_greedy_search(log_probs, out_lengths)
        return
    if mode == "attention":
        # Capped at the reference's length: an untrained decoder rarely picks <eos>, so every
        # preset runs its beam for as many steps (the encoder length would be the cap otherwise).
        attention_beam_search(model, memory, valid, opts.beam, max(ref_lengths[u.key] for u in group))
        return
    nbests = ctc_prefix_beam_search(log_probs, out_lengths, opts.beam)
    if mode == "ctc_prefix_beam":
        return
    generator = torch.Generator().manual_seed(0)
    realistic = []
    for utt, nbest in zip(group, nbests):
        # Untrained CTC gives hypotheses of arbitrary length: substitute `beam` hypotheses of the
        # reference's length, keeping the search's scores (their values do not affect cost).
        length = ref_lengths[utt.key]
        scores = [s for _, s in nbest] + [nbest[-1][1]] * (opts.beam - len(nbest))
        ids = torch.randint(1, model.cfg.vocab_size - 1, (opts.beam, length), generator=generator).tolist()
        realistic.append(list(zip(ids, scores)))
    attention_rescoring(model, memory, valid, realistic, opts.ctc_weight, opts.reverse_weight)


def _print_table(results, modes, baseline: str, num_utts: int, audio_seconds: float,
                 args: argparse.Namespace) -> None:
    context = f"chunk {args.chunk_size}, left chunks {args.left_chunks}" if args.chunk_size > 0 else "full context"
    if args.cuda_graphs:
        context += ", chunk step as a CUDA graph"
    print(f"RTF on {num_utts} utterances ({audio_seconds:.1f} s of audio), device {args.device}, "
          f"threads {args.threads}, batch {args.batch_size}, {args.dtype}, {context}, beam {args.beam}, "
          f"median of {args.repeats} pass(es)")
    header = "| preset | " + " | ".join(f"{m} RTF | {m} / {baseline}" for m in modes) + " |"
    print(header)
    print("|" + " --- |" * (1 + 2 * len(modes)))
    for preset, by_mode in results.items():
        cells = " | ".join(f"{by_mode[m]['rtf']:.4f} | {by_mode[m]['ratio']:.2f}x" for m in modes)
        print(f"| {preset} | {cells} |")
