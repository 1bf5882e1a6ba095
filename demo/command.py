"""`u2moe demo`: the whole path on a corpus the demo generates itself, in minutes.

Stages (each timed; a second run reuses what is prepared):
  1 corpus   shipped sentences (demo/sentences.txt) spoken by espeak-ng with many
             voices, rates and pitches -> Kaldi dirs train/dev/test (held-out sentences)
  2 prep     `u2moe prep shards` (x3), `prep units` (characters), `prep cmvn`
  3 train    `u2moe train` (tiny_moe) under torchrun: one process per GPU (expert parallel), or one
             CPU process on every core; a fixed number of steps (--max-steps), seeded, so that
             the result is the same on a slow or busy machine, only later
  4 export   `u2moe export`, averaging the last checkpoints
  5 decode   `u2moe decode` with the four modes on the test set (CER/WER), then the real-time
             factor of each mode (1 thread on the CPU, batch 1; fbank + encoder + search)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data_prep.cmvn import compute_cmvn
from ..data_prep.shard_writer import write_shards
from ..data_prep.stats import DataStats
from ..data_prep.tokenizer import Tokenizer
from ..data_prep.units import train_units
from ..inference.decoding.data import batch_fbank, decoding_data_config, read_utterances
from ..inference.decoding.search import DecodeOptions, decode_batch
from ..inference.model_file import load_model_file
from ..trainer.checkpoint import list_tags
from .corpus import CorpusError, CorpusSpec, generate

MODES = ("ctc_greedy", "ctc_prefix_beam", "attention", "attention_rescoring")

# The demo's changes to the tiny_moe preset: learn fast on clean synthetic speech, in a fixed
# number of steps (the same result on a slow or busy machine, only later).
DEMO_STEPS = 1800
NO_DROPOUT = [f"model.encoder.{k}=0.0" for k in ("dropout_rate", "positional_dropout_rate",
                                               "attention_dropout_rate", "ffn.dropout_rate")] + [
    f"model.decoder.{k}=0.0" for k in ("dropout_rate", "positional_dropout_rate", "self_attention_dropout_rate",
                                       "src_attention_dropout_rate", "ffn.dropout_rate")]
DEMO_SETS = [
    # Full context only, as the demo decodes: no chunk masks, and a convolution that looks ahead.
    "model.encoder.use_dynamic_chunk=false",
    "model.encoder.causal=false",
    # A narrow front-end: at 128 channels its second convolution is a third of the step on a CPU.
    "model.encoder.subsampling_channels=32",
    "model.decoder.num_blocks=2",  # one block learns to attend too slowly to decode on its own
    *NO_DROPOUT,  # a short run on clean speech: dropout's random masks cost time and slow learning
    "model.ctc_weight=0.5",
    "data.spec_aug.enabled=false",
    # Small batches, many steps: a run this short gains more from updates than from larger batches.
    "data.batch.max_frames_in_batch=2400",
    "data.filter.max_frames=2400",
    "data.batch.shuffle_buffer=1000",
    "optim.lr=0.003",
    "optim.warmup_steps=300",
    "optim.schedule=cosine",  # to zero at the last step: a known length ends at a low rate
    "train.max_epochs=100",
    "train.num_workers=0",  # the training process uses every core already
    "train.log_interval=50",
    "train.keep_checkpoints=3",
]
# --tiny-test: a model and corpus small enough for CI (every stage, a few steps).
TINY_TEST_SETS = [
    "model.encoder.output_size=64", "model.encoder.attention_heads=2", "model.encoder.num_blocks=2",
    "model.encoder.ffn.hidden_units=128", "model.decoder.attention_heads=2",
    "model.decoder.ffn.hidden_units=128", "train.log_interval=1",
]


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    note: str = ""


@dataclass
class Demo:
    args: argparse.Namespace
    work: Path
    stages: list[Stage] = field(default_factory=list)
    start: float = field(default_factory=time.monotonic)

    def banner(self, index: int, name: str, what: str) -> None:
        elapsed = time.monotonic() - self.start
        print(f"\n=== [{index}/5] {name}: {what}  (demo time {elapsed / 60:.1f} min)", flush=True)

    def done(self, name: str, t0: float, note: str = "") -> None:
        stage = Stage(name, time.monotonic() - t0, note)
        self.stages.append(stage)
        print(f"--- {name} done in {stage.seconds:.1f} s{': ' + note if note else ''}", flush=True)


def _log(msg: str) -> None:
    print(msg, flush=True)


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _env(threads: int = 1) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def _u2moe(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "u2moe", *args]


def _run(cmd: list[str], log: Path, show=None, threads: int = 1) -> None:
    """Run a command, keep its whole output in `log`, print the lines `show` accepts."""
    log.parent.mkdir(parents=True, exist_ok=True)
    _log("$ " + " ".join(cmd))
    with log.open("a", buffering=1) as f, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True, env=_env(threads), bufsize=1) as proc:
        tail: list[str] = []
        for line in proc.stdout:
            f.write(line)
            tail = (tail + [line])[-30:]
            if show is None or show(line):
                print("  " + line.rstrip(), flush=True)
        rc = proc.wait()
    if rc:
        sys.stdout.write("".join(tail))
        raise RuntimeError(f"command failed (exit {rc}); full log: {log}")


def _devices() -> tuple[int, bool]:
    """(processes, on GPU): one per GPU, or one CPU process using every core (on a CPU, several
    gloo processes spend a large share of a small model's step exchanging tokens and gradients)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return (gpus, True) if gpus else (1, False)


def expert_parallel_size(world: int, experts: int = 8) -> int:
    """The largest size dividing both the world size and the number of experts."""
    return max(p for p in range(1, min(world, experts) + 1) if world % p == 0 and experts % p == 0)


def _ds_config(path: Path, nproc: int, gpu: bool) -> Path:
    zero = {"stage": 2, "reduce_bucket_size": 200000000, "allgather_bucket_size": 200000000, "overlap_comm": True,
            "contiguous_gradients": True, "reduce_scatter": True} if nproc > 1 else {"stage": 0}
    cfg = {"zero_optimization": zero, "wall_clock_breakdown": False}
    if gpu:
        import torch

        if torch.cuda.is_bf16_supported():
            cfg["bf16"] = {"enabled": True}
    path.write_text(json.dumps(cfg, indent=1) + "\n")
    return path


# ------------------------------------------------------------------------------------- stages
def stage_corpus(demo: Demo) -> dict[str, Path]:
    a = demo.args
    demo.banner(1, "corpus", "sentences spoken by espeak-ng (several voices, rates, pitches)")
    t0 = time.monotonic()
    if a.tiny_test:
        spec = CorpusSpec(train_sentences=24, dev_sentences=4, test_sentences=6, train_voices=1)
    else:
        spec = CorpusSpec(train_voices=a.voices)
    dirs = generate(demo.work / "corpus", spec, jobs=a.jobs, log=_log)
    summary = json.loads((demo.work / "corpus" / ".done.json").read_text())["summary"]
    demo.done("corpus", t0, summary)
    return dirs


def stage_prep(demo: Demo, dirs: dict[str, Path]) -> dict[str, Path]:
    demo.banner(2, "prep", f"u2moe prep shards / units ({demo.args.units}) / cmvn")
    t0 = time.monotonic()
    import logging

    logging.basicConfig(level=logging.INFO, format="  %(message)s", force=True)
    data = demo.work / "data"
    for split, d in dirs.items():
        # At least 8 shards where possible: shards are dealt to ranks (and loader workers) whole.
        utts = sum(1 for line in (d / "text").read_text().splitlines() if line.strip())
        write_shards(str(d), str(data / "shards" / split), utts_per_shard=max(1, min(200, utts // 8)),
                     jobs=demo.args.jobs, overwrite=True)
    a = demo.args
    train_units(str(dirs["train"] / "text"), str(data / "units"), a.units,
                vocab_size=None if a.units == "char" else a.vocab_size, overwrite=True)
    compute_cmvn(str(data / "shards" / "train" / "shards.list"), str(data / "cmvn.json"), None,
                 max_utts=500, jobs=demo.args.jobs, overwrite=True)
    logging.getLogger().setLevel(logging.WARNING)
    demo.done("prep", t0)
    return {"train": data / "shards" / "train" / "shards.list", "dev": data / "shards" / "dev" / "shards.list",
            "test": data / "shards" / "test" / "shards.list", "units": data / "units", "cmvn": data / "cmvn.json"}


def _show_train_line(line: str) -> bool:
    return bool(re.search(r"\] (epoch \d+ step|dev step|checkpoint|resumed|stopping)|Error|error:", line))


def stage_train(demo: Demo, data: dict[str, Path]) -> dict:
    a = demo.args
    nproc, gpu = _devices()
    if a.nproc:
        nproc = a.nproc
    ep = expert_parallel_size(nproc)
    threads = 1 if gpu else cpu_cores()
    where = f"{nproc} GPU(s)" if gpu else f"{nproc} CPU process(es), {threads} thread(s)"
    demo.banner(3, "train", f"u2moe train tiny_moe on {where}, expert parallelism {ep}, {a.max_steps} steps")
    t0 = time.monotonic()
    exp = demo.work / "exp"
    sets = DEMO_SETS + (TINY_TEST_SETS if a.tiny_test else []) + [
        f"model.vocab_size={Tokenizer.load(str(data['units'])).vocab_size}",
        f"train.expert_parallel_size={ep}"] + list(a.set)
    corpus = json.loads((demo.work / "corpus" / ".done.json").read_text())["fingerprint"]
    units = (data["units"] / "units.txt").read_text(encoding="utf-8")
    fingerprint = {"sets": sets, "nproc": nproc, "max_steps": a.max_steps,
                   "corpus": corpus, "units": hashlib.sha256(units.encode()).hexdigest()[:16]}
    marker = exp / "demo_train_done.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("fingerprint") == fingerprint:
            _log(f"already trained: {exp} ({info['note']}); delete {exp} to train from scratch")
            demo.done("train", t0, info["note"] + " (reused)")
            return info
        _log(f"{exp} was trained with other options or data: training again from scratch")
        shutil.rmtree(exp)
    exp.mkdir(parents=True, exist_ok=True)
    ds = _ds_config(demo.work / "ds_config.json", nproc, gpu)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = launcher + ["-m", "u2moe", "train", "--config", "tiny_moe", "--ds-config", str(ds),
                      "--train-shards", str(data["train"]), "--dev-shards", str(data["dev"]),
                      "--units", str(data["units"]), "--cmvn", str(data["cmvn"]), "--exp-dir", str(exp),
                      "--max-steps", str(a.max_steps)]
    for item in sets:
        cmd += ["--set", item]
    _run(cmd, exp / "train.log", show=_show_train_line, threads=threads)
    info = _train_summary(exp)
    info["fingerprint"] = fingerprint
    marker.write_text(json.dumps(info, indent=1) + "\n")
    demo.done("train", t0, info["note"])
    return info


def _train_summary(exp: Path) -> dict:
    tags = list_tags(exp / "checkpoints")
    steps = int(tags[-1].split("_")[-1]) if tags else 0
    dev = {}
    metrics = exp / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if rec["split"] == "dev":
                dev = rec
    note = f"{steps} steps"
    if "cer" in dev:
        note += f", last dev CTC-greedy CER {dev['cer']:.1f}% WER {dev['wer']:.1f}% (step {dev['step']})"
    return {"steps": steps, "dev": dev, "note": note}


def stage_export(demo: Demo) -> Path:
    demo.banner(4, "export", "u2moe export (average of the last checkpoints)")
    t0 = time.monotonic()
    exp = demo.work / "exp"
    average = min(demo.args.average, len(list_tags(exp / "checkpoints")))
    out = exp / "model.pt"
    _run(_u2moe(["export", "--exp-dir", str(exp), "--out", str(out), "--average", str(max(average, 1))]),
         exp / "export.log")
    demo.done("export", t0, f"{out} (average of {average})")
    return out


def stage_decode(demo: Demo, model: Path, data: dict[str, Path]) -> dict[str, dict]:
    demo.banner(5, "decode", f"u2moe decode, {len(MODES)} modes, held-out test sentences; RTF (1 thread)")
    t0 = time.monotonic()
    out = demo.work / "exp" / "test"
    _run(_u2moe(["decode", "--model", str(model), "--shards", str(data["test"]), "--modes", ",".join(MODES),
                 "--batch-size", "16", "--out", str(out)]), out.with_suffix(".log"),
         show=lambda line: "WER" in line or "CER" in line or "error" in line.lower())
    report = json.loads((out / "wer.json").read_text())
    rtf = measure_rtf(model, data["test"], demo.args.rtf_utts)
    for mode in MODES:
        report[mode]["rtf"] = rtf["rtf"][mode]
    report["_audio"] = {"utts": rtf["utts"], "seconds": rtf["seconds"]}
    (out / "summary.json").write_text(json.dumps(report, indent=1) + "\n")
    demo.done("decode", t0)
    return report


def measure_rtf(model_path: Path, shards: Path, max_utts: int) -> dict:
    """Per mode: (fbank + encoder + search) wall time / audio duration, batch 1, 1 CPU thread."""
    import torch
    from tqdm import tqdm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, config, _ = load_model_file(str(model_path))
        model.eval()
        data_cfg = decoding_data_config(config)
        utts = list(read_utterances(data_cfg, DataStats(), shards=str(shards), limit=max_utts + 1))
        warmup, timed = utts[0], utts[1:] or utts
        seconds = sum(u.duration for u in timed)
        opts = DecodeOptions(beam=10, ctc_weight=0.3, reverse_weight=0.5, chunk_size=-1, left_chunks=-1)
        rtf = {}
        with torch.inference_mode():
            for mode in MODES:
                feats, lengths = batch_fbank([warmup.wave], data_cfg)
                decode_batch(model, feats, lengths, [mode], opts)
                elapsed = 0.0
                for utt in tqdm(timed, desc=f"RTF {mode}", unit="utt", file=sys.stdout, mininterval=1.0,
                                leave=False):
                    start = time.perf_counter()
                    feats, lengths = batch_fbank([utt.wave], data_cfg)
                    decode_batch(model, feats, lengths, [mode], opts)
                    elapsed += time.perf_counter() - start
                rtf[mode] = elapsed / seconds
    finally:
        torch.set_num_threads(threads)
    return {"rtf": rtf, "utts": len(timed), "seconds": seconds}


def print_summary(demo: Demo, train: dict, report: dict) -> None:
    total = time.monotonic() - demo.start
    audio = report["_audio"]
    print("\n=== summary", flush=True)
    print("| stage | seconds | note |\n| --- | --- | --- |")
    for s in demo.stages:
        print(f"| {s.name} | {s.seconds:.1f} | {s.note} |")
    print(f"| total | {total:.1f} | {total / 60:.1f} min |")
    print(f"\ntest set: held-out sentences, RTF over {audio['utts']} utterances ({audio['seconds']:.1f} s of audio), "
          f"CPU, 1 thread, batch 1, fp32")
    print("| mode | CER % | WER % | RTF |\n| --- | --- | --- | --- |")
    for mode in MODES:
        r = report[mode]
        print(f"| {mode} | {100 * r['cer']['rate']:.2f} | {100 * r['wer']['rate']:.2f} | {r['rtf']:.4f} |")
    print(f"\nmodel: {demo.work / 'exp' / 'model.pt'}; hypotheses: {demo.work / 'exp' / 'test'}/<mode>.txt", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    if args.max_steps is None:
        args.max_steps = 4 if args.tiny_test else DEMO_STEPS
    if args.max_steps < 1:
        print(f"u2moe demo: error: --max-steps must be >= 1, got {args.max_steps}", file=sys.stderr)
        return 2
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    demo = Demo(args, work)
    try:
        dirs = stage_corpus(demo)
        data = stage_prep(demo, dirs)
        train = stage_train(demo, data)
        model = stage_export(demo)
        report = stage_decode(demo, model, data)
    except (CorpusError, RuntimeError) as err:
        print(f"u2moe demo: error: {err}", file=sys.stderr)
        return 1
    print_summary(demo, train, report)
    (work / "summary.json").write_text(json.dumps(
        {"stages": {s.name: s.seconds for s in demo.stages}, "total_seconds": time.monotonic() - demo.start,
         "train": {k: v for k, v in train.items() if k != "fingerprint"},
         "test": report}, indent=1) + "\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole path (corpus, prep, train, export, decode) on a generated corpus")
    p.add_argument("--work-dir", default="demo_work", help="everything goes here; a rerun reuses it")
    p.add_argument("--max-steps", type=int, default=None,
                   help=f"training steps (default: {DEMO_STEPS}; 4 with --tiny-test): a fixed number, so that a "
                        "busy machine takes longer, not learns less")
    p.add_argument("--units", default="char", choices=("char", "bpe"),
                   help="output units (bpe learns much slower on a corpus this small: its CTC can stay blank "
                        "through the demo's budget)")
    p.add_argument("--vocab-size", type=int, default=300, help="size of the bpe unit table")
    p.add_argument("--voices", type=int, default=3, help="speakers per training sentence")
    p.add_argument("--average", type=int, default=3, help="checkpoints averaged by the export")
    p.add_argument("--nproc", type=int, default=0,
                   help="training processes (default: one per GPU, or one CPU process using every core)")
    p.add_argument("--jobs", type=int, default=2, help="parallel processes for corpus generation and prep")
    p.add_argument("--rtf-utts", type=int, default=40, help="test utterances timed for the RTF")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for the training config (repeatable)")
    p.add_argument("--tiny-test", action="store_true",
                   help="CI size: 24 training sentences, a 2-block model, 4 steps (checks every stage)")
    p.set_defaults(handler=run_demo)
