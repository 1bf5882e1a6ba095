"""The DeepSpeed trainer: config ownership, schedule, resume after SIGKILL, uneven data, export."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
import torch

from spawn_helpers import free_port, send_result, spawn_ranks
from trainer_helpers import (kill_all, prepare_corpus, run, start, train_command, train_losses,
                             wait_for)
from u2moe.configs.train import OptimConfig, TrainConfig
from u2moe.trainer.progress import BlankOutputWatch
from u2moe.trainer.ds_config import (DeepSpeedConfigError, engine_config, load_ds_config, offloads_to_host, precision,
                                     trainer_clips, trainer_runs_bf16)
from u2moe.trainer.scheduler import build_scheduler


# Dropout off: runs compared step by step must draw no random numbers of their own.
NO_DROPOUT = [f"model.{part}={0.0}" for part in (
    "encoder.dropout_rate", "encoder.positional_dropout_rate", "encoder.attention_dropout_rate",
    "encoder.ffn.dropout_rate", "decoder.dropout_rate", "decoder.positional_dropout_rate",
    "decoder.self_attention_dropout_rate", "decoder.src_attention_dropout_rate", "decoder.ffn.dropout_rate")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return prepare_corpus(tmp_path_factory.mktemp("corpus"))


def test_ds_config_refuses_what_the_yaml_owns(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}))
    with pytest.raises(DeepSpeedConfigError, match=r"ds\.json.*gradient_clipping.*train\.grad_clip"):
        load_ds_config(path, TrainConfig(), 2)
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(DeepSpeedConfigError, match="stage 3"):
        load_ds_config(path, TrainConfig(), 2)
    path.write_text(json.dumps({"zero_optimization": {"stage": 0}, "fp16": {"enabled": True}}))
    with pytest.raises(DeepSpeedConfigError, match="fp16 needs ZeRO"):
        load_ds_config(path, TrainConfig(), 1)
    # bf16 without ZeRO: the trainer's own bf16 mode, one process only, on an fp32 engine.
    path.write_text(json.dumps({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}))
    with pytest.raises(DeepSpeedConfigError, match="one process.*not 2"):
        load_ds_config(path, TrainConfig(), 2)
    cfg = load_ds_config(path, TrainConfig(), 1)
    assert trainer_runs_bf16(cfg) and precision(cfg) == "bf16" and "bf16" not in engine_config(cfg)
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}}))
    cfg = load_ds_config(path, TrainConfig(), 2)
    assert not trainer_runs_bf16(cfg) and engine_config(cfg) is cfg
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
                                "torch_autocast": {"enabled": True}}))
    with pytest.raises(DeepSpeedConfigError, match="bf16 and torch_autocast"):
        load_ds_config(path, TrainConfig(), 2)
    path.write_text(json.dumps({"zero_optimization": {"stage": 0}, "torch_autocast": {"enabled": True,
                                                                                       "dtype": "int8"}}))
    with pytest.raises(DeepSpeedConfigError, match="int8"):
        load_ds_config(path, TrainConfig(), 2)
    # Without ZeRO the trainer clips, so DeepSpeed must not clip a second time.
    path.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    cfg = load_ds_config(path, TrainConfig(grad_clip=3.0), 2)
    assert trainer_clips(cfg) and cfg["gradient_clipping"] == 0.0
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    cfg = load_ds_config(path, TrainConfig(grad_clip=3.0, accum_grad=4), 2)
    assert (cfg["gradient_clipping"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (3.0, 4, 8)


def test_blank_output_watch_tells_once_after_the_warm_up():
    watch = BlankOutputWatch(warmup_steps=100, patience=3)
    # Before the warm-up ends an empty output is expected: it does not count.
    assert [watch.update(step, 100.0) for step in (20, 60, 99)] == [None] * 3
    # A learning encoder (some output) breaks the streak.
    assert [watch.update(step, e) for step, e in ((100, 100.0), (120, 100.0), (140, 80.0))] == [None] * 3
    said = [watch.update(step, 100.0) for step in (160, 180, 200, 220, 240, 260)]
    assert said[:2] == [None, None] and "step 200" in said[2] and "optim.lr" in said[2]
    assert said[3:] == [None] * 3  # once


def _rates(cfg: OptimConfig, total_steps: int, steps: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, total_steps)
    seen = []
    for _ in range(steps):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return seen


def test_warmup_lr_follows_wenet_formula():
    seen = _rates(OptimConfig(lr=0.002, warmup_steps=100), 0, 300)
    for i, lr in enumerate(seen):
        step = i + 1
        assert lr == pytest.approx(0.002 * 100 ** 0.5 * min(step ** -0.5, step * 100 ** -1.5))
    assert max(seen) == pytest.approx(0.002) and seen.index(max(seen)) == 99


def test_cosine_schedule_warms_up_then_ends_at_the_final_rate():
    cfg = OptimConfig(lr=0.003, warmup_steps=100, schedule="cosine", final_lr_ratio=0.1)
    seen = _rates(cfg, 1000, 1000)
    assert seen[:100] == pytest.approx([0.003 * s / 100 for s in range(1, 101)])
    # halfway through the decay: the mean of the peak and the final rate
    assert seen[549] == pytest.approx(0.003 * (0.1 + 0.9 * 0.5))
    assert seen[-1] == pytest.approx(0.0003, rel=1e-4)
    assert all(a >= b for a, b in zip(seen[99:], seen[100:]))


@pytest.mark.slow
def test_killed_two_process_run_resumes_and_matches_the_uninterrupted_run(corpus, tmp_path):
    # Two ranks with expert parallelism 2 and ZeRO-2: each rank holds 4 of the 8 experts.
    extra = ["train.save_interval=4", "train.max_epochs=3", "train.max_steps=9",
             "train.expert_parallel_size=2"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    run(train_command(corpus, ref_dir, nproc=2, extra=[*extra, "train.keep_checkpoints=10"]),
        timeout=600, log=tmp_path / "ref.log")
    reference = train_losses(ref_dir)
    last_step = max(reference)
    assert last_step == 9

    cmd = train_command(corpus, run_dir, nproc=2, extra=extra)
    proc = start(cmd, tmp_path / "killed.log")
    # Killed mid-epoch, one step after the step-4 checkpoint.
    wait_for(lambda: 5 in _logged_steps(run_dir), 600, proc)
    kill_all(proc)
    run(cmd, timeout=600, log=tmp_path / "resumed.log")
    assert "resumed from step 4" in (tmp_path / "resumed.log").read_text()
    # Expert parallelism: the log gives the all-to-all's share of the step time.
    assert all(0 < r["all_to_all_share"] < 1 for r in train_losses(ref_dir).values())
    resumed = train_losses(run_dir)
    assert max(resumed) == last_step
    for step in range(5, last_step + 1):
        for term in ("loss", "loss_ctc", "loss_att"):
            assert resumed[step][term] == pytest.approx(reference[step][term], rel=1e-3), (step, term)
        assert resumed[step]["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=1e-3)

    _check_export(corpus, ref_dir, tmp_path)


def _check_export(corpus, exp_dir, tmp_path):
    """model.pt from an expert-parallel run, loaded by one process holding all experts."""
    from u2moe.configs.experiment import load_config
    from u2moe.data_prep import Tokenizer, build_dataloader
    from u2moe.inference.model_file import load_model_file
    from u2moe.trainer.checkpoint import list_tags, read_fp32_weights
    from u2moe.trainer.export import export_model

    # Averaging: the mean of the last two checkpoints' fp32 weights, experts of both ranks merged.
    used = export_model(exp_dir, tmp_path / "avg.pt", average=2)
    assert used == list_tags(exp_dir / "checkpoints")[-2:]
    model, config, units = load_model_file(tmp_path / "avg.pt")
    a, b = (read_fp32_weights(exp_dir / "checkpoints" / t) for t in used)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, (a[name].double() + b[name].double()).div(2).float())
    assert len(units) == corpus["vocab"] and config["model"]["vocab_size"] == corpus["vocab"]
    assert model.moe_layers()[0][1].experts.w1.size(0) == 8

    # Outputs: the dev loss the two expert-parallel ranks logged at the epoch-end checkpoint,
    # recomputed by one process from the exported file.
    dev = next(r for r in map(json.loads, (exp_dir / "metrics.jsonl").read_text().splitlines())
               if r["split"] == "dev")
    export_model(exp_dir, tmp_path / "model.pt", tag=f"step_{dev['step']:08d}")
    model, _, _ = load_model_file(tmp_path / "model.pt")
    cfg = load_config(exp_dir / "train.yaml")
    loader = build_dataloader(corpus["dev"], Tokenizer.load(corpus["units"]), cfg.data, train=False,
                              seed=cfg.train.seed, rank=0, world_size=1)
    from u2moe.inference.decoding.ctc_greedy import ctc_greedy_search

    total, utts, empty = 0.0, 0, 0
    with torch.no_grad():
        for batch in loader:
            out = model(batch["feats"], batch["feats_lengths"], batch["target"], batch["target_lengths"])
            total += float(out["loss"]) * len(batch["keys"])
            utts += len(batch["keys"])
            memory, valid = model.encoder(batch["feats"], batch["feats_lengths"])
            empty += sum(not hyp for hyp in ctc_greedy_search(model.ctc.log_softmax(memory), valid.sum(1)))
    assert utts == 8
    assert total / utts == pytest.approx(dev["loss"], rel=1e-4)
    assert dev["empty"] == pytest.approx(100 * empty / utts)  # the share of empty CTC greedy outputs

    # Warm start: a one-process run (expert parallelism 1) starts from that file; with a
    # vanishing learning rate its first checkpoint holds the same weights.
    warm = tmp_path / "warm"
    run(train_command(corpus, warm, nproc=1, extra=["train.max_steps=1", "optim.lr=1e-12"])
        + ["--init-model", str(tmp_path / "model.pt")], timeout=600, log=tmp_path / "warm.log")
    export_model(warm, tmp_path / "warm.pt")
    started, _, _ = load_model_file(tmp_path / "warm.pt")
    for name, value in started.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], atol=1e-6, rtol=0, msg=name)


def _logged_steps(exp_dir):
    try:
        return train_losses(exp_dir)
    except (FileNotFoundError, ValueError):  # not written yet, or a line half-written
        return {}


@pytest.mark.slow
def test_uneven_shards_end_the_epoch_on_every_rank(tmp_path):
    # 5 shards over 2 ranks: one rank reads 3 (36 utterances), the other 2 (one of them small).
    data = prepare_corpus(tmp_path / "uneven", train_utts=52, utts_per_shard=12)
    # Without epoch checkpoints, only the end of training writes one.
    run(train_command(data, tmp_path / "exp", nproc=2,
                      extra=["train.max_epochs=2", "train.save_interval=0", "train.epoch_checkpoints=false"]),
        timeout=600, log=tmp_path / "uneven.log")
    log = (tmp_path / "uneven.log").read_text()
    assert log.count("dev step") == 2  # both epochs ran to their end
    assert len(list((tmp_path / "exp" / "checkpoints").glob("step_*"))) == 1
    records = train_losses(tmp_path / "exp")
    assert records and all(math.isfinite(r["loss"]) for r in records.values())
    # The share of each epoch's utterances that the rank with data to spare did not train on.
    rows = [json.loads(line) for line in (tmp_path / "exp" / "metrics.jsonl").read_text().splitlines()]
    left_out = [r for r in rows if r["split"] == "epoch_data"]
    assert [(r["epoch"], r["utterances"]) for r in left_out] == [(0, 52), (1, 52)]
    for r in left_out:
        assert 0 <= r["left_out"] < 52 and r["left_out_share"] == pytest.approx(r["left_out"] / 52)
        assert f"epoch {r['epoch']}: {r['left_out']} of 52 utterances" in log


def _watchdogs(directory: Path, timeout: float) -> tuple[list[int], list]:
    """Two ranks' watchdogs in this process; a list receives the exit statuses they would end with."""
    from u2moe.trainer.watchdog import StepWatchdog

    ended: list[int] = []
    return ended, [StepWatchdog(directory, r, 2, timeout, end_process=ended.append) for r in (0, 1)]


def _watchdog_line(ended: list[int], caplog, timeout: float) -> str:
    """The line of the first watchdog to end its process."""
    wait_for(lambda: ended, 4 * timeout)
    assert ended[0] == 3
    return next(r.getMessage() for r in caplog.records if r.getMessage().startswith("watchdog:"))


def test_watchdog_names_a_silent_peer_or_else_the_one_idle_longest(tmp_path, caplog):
    # Rank 1 stops whole after step 4 (its heartbeat thread too, as under SIGSTOP).
    ended, (rank0, rank1) = _watchdogs(tmp_path / "stopped", 1.0)
    with rank0, rank1:
        rank0.beat(4)
        rank1.beat(4)
        time.sleep(2 * rank1.interval)
        rank1._stop.set()
        rank1._thread.join()
        line = _watchdog_line(ended, caplog, 1.0)
        time.sleep(1.0)  # the stopped rank's watchdog does not run
    assert ended == [3]
    assert line.startswith("watchdog: rank 0 made no training progress for 1 s after step 4 "
                           "(train.watchdog_seconds=1): rank 1 (pid ")
    assert "last at step 4, no heartbeat for" in line and line.endswith("stopped or died; ending this process")

    # Both alive; rank 1 stopped making progress first (hung in its data, say): rank 1 is named.
    caplog.clear()
    ended, (rank0, rank1) = _watchdogs(tmp_path / "hung", 1.0)
    with rank0, rank1:
        rank1.beat(7)
        time.sleep(0.4)
        rank0.beat(8)
        line = _watchdog_line(ended, caplog, 1.0)
    assert line.startswith("watchdog: rank 1 made no training progress for 1 s after step 7")
    assert "rank 1 (pid " in line and "last at step 7, no progress for" in line
    assert line.endswith("is hung; ending this process")


@pytest.mark.slow
def test_a_stopped_rank_ends_every_rank_with_a_line_naming_it(corpus, tmp_path):
    from u2moe.trainer.checkpoint import list_tags
    from u2moe.trainer.export import export_model

    exp, log = tmp_path / "exp", tmp_path / "train.log"
    watchdog = 4
    proc = start(train_command(corpus, exp, nproc=2, extra=[f"train.watchdog_seconds={watchdog}",
                                                            "train.expert_parallel_size=2"]), log)
    try:
        # Stopped a step after the first epoch's checkpoint, several steps before the next.
        wait_for(lambda: list_tags(exp / "checkpoints") and
                 max(_logged_steps(exp), default=0) > int(list_tags(exp / "checkpoints")[0][5:]), 300, proc)
        tags = list_tags(exp / "checkpoints")
        pid = json.loads((exp / "heartbeats" / "rank1.json").read_text())["pid"]
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        # The watchdog ends rank 0 within its time; torchrun ends the stopped rank 30 s later.
        assert proc.wait(timeout=watchdog + 30 + 30) != 0
        assert time.monotonic() - stopped < watchdog + 30 + 20
    finally:
        kill_all(proc)
    assert not Path(f"/proc/{pid}").exists()
    lines = [line for line in log.read_text().splitlines() if "watchdog:" in line]
    assert len(lines) == 1 and "[rank 0] watchdog: rank 0 made no training progress" in lines[0]
    assert f"rank 1 (pid {pid} on " in lines[0] and lines[0].endswith("stopped or died; ending this process")
    # The last complete checkpoint is intact: it exports.
    assert list_tags(exp / "checkpoints") == tags
    assert export_model(exp, tmp_path / "model.pt") == tags[-1:]


def test_launcher_script_runs_without_a_deepspeed_script_on_path(tmp_path):
    """Installs without console scripts (pip --target, as on the GPU machine) have DeepSpeed's
    launcher module only; launch/train.sh then runs that module with $PYTHON."""
    assert shutil.which("deepspeed", path="/usr/bin:/bin") is None
    script = Path(__file__).resolve().parents[1] / "launch" / "train.sh"
    proc = subprocess.run(["bash", str(script), "--gpus", "1", "--port", str(free_port()), "--", "--help"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "usage: u2moe train" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_eight_ranks_with_expert_parallelism_8_through_the_launcher_script(tmp_path):
    """An 8-GPU expert-parallel run at toy scale on CPU: launch/train.sh, 8 processes, one expert
    each, ZeRO-2. The exported model.pt, in one process with all 8 experts, gives the dev loss the
    8 ranks logged at the end of the epoch."""
    from u2moe.data_prep import build_dataloader
    from u2moe.configs.data import DataConfig
    from u2moe.data_prep.tokenizer import Tokenizer
    from u2moe.inference.model_file import load_model_file
    from u2moe.trainer.export import export_model

    data = prepare_corpus(tmp_path / "data", train_utts=48, utts_per_shard=6)  # one shard per rank
    exp = tmp_path / "exp"
    cmd = train_command(data, exp, nproc=1, ds_config="zero2_fp32",
                        extra=["train.expert_parallel_size=8", "train.max_epochs=1"])
    port = free_port()
    launcher = ["bash", str(Path(__file__).resolve().parents[1] / "launch" / "train.sh"), "--gpus", "8",
                "--port", str(port), "--"]
    env_path = str(Path(sys.executable).parent)  # the launcher calls `deepspeed` from the venv
    log = tmp_path / "train.log"
    with log.open("w") as f:
        proc = subprocess.run(launcher + cmd[cmd.index("--config"):], stdout=f, stderr=subprocess.STDOUT,
                              timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                "PATH": f"{env_path}:{os.environ['PATH']}"})
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert "trained" in text
    # Every rank took part: each of the 8 expert-parallel ranks wrote its expert's weights.
    tags = sorted((exp / "checkpoints").glob("step_*"))
    assert tags and all((tags[-1] / f"fp32_ep{r}.pt").is_file() for r in range(8))
    # DeepSpeed's shared-memory all-reduce buffers (one a rank) are not left in /dev/shm.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    dev = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    dev = [r for r in dev if r["split"] == "dev"]
    assert len(dev) == 1

    export_model(exp, tmp_path / "model.pt")
    model, config, _ = load_model_file(tmp_path / "model.pt")
    assert model.moe_layers() and all(m.experts.w1.size(0) == 8 for _, m in model.moe_layers())
    loader = build_dataloader(data["dev"], Tokenizer.load(data["units"]), DataConfig.from_dict(config["data"]),
                              train=False, rank=0, world_size=1)
    total = utts = 0.0
    with torch.no_grad():
        for batch in loader:
            memory, valid = model.encoder(batch["feats"], batch["feats_lengths"])
            losses = model.losses(memory, valid, batch["target"], batch["target_lengths"])
            total += float(losses["loss"]) * len(batch["keys"])
            utts += len(batch["keys"])
    assert utts == 8 and total / utts == pytest.approx(dev[0]["loss"], rel=1e-4)


def test_an_epoch_without_a_step_stops_the_run(corpus, tmp_path):
    """Every utterance filtered out: the run stops with a message instead of spinning through epochs."""
    cmd = train_command(corpus, tmp_path / "exp", nproc=1, extra=["data.filter.max_tokens=1"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # a user error: one line, no traceback
    assert f"epoch 0 ended before its first step: a rank read no training batch from {corpus['train']}" in proc.stderr
    assert "skipped" in proc.stderr and "too_many_tokens" in proc.stderr


def test_run_summary_counts_every_trained_second_of_audio(corpus, tmp_path):
    """The closing line of `u2moe train`: audio trained (2 epochs of the whole training set) per
    second of training time, evaluation and checkpoints left out. (Run in the trainer's own bf16
    mode, whose dev evaluations also run the bf16 model.)"""
    from test_data_support import read_kaldi_table

    exp = tmp_path / "exp"
    started = time.monotonic()
    run(train_command(corpus, exp, nproc=1, ds_config="zero0_pure_bf16",
                      extra=["train.max_epochs=2", "train.expert_parallel_size=1"]),
        timeout=300, log=tmp_path / "train.log")
    wall = time.monotonic() - started
    root = corpus["train"].parents[1] / "corpus"
    audio = sum(sf.info(str(root / rel)).duration for rel in read_kaldi_table(root / "train" / "wav.scp").values())
    rows = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    summary = [r for r in rows if r["split"] == "run"]
    assert len(summary) == 1 and summary[0]["audio_seconds"] == pytest.approx(2 * audio, abs=0.1)
    dev = [r for r in rows if r["split"] == "dev"]
    assert len(dev) == 2 and all(math.isfinite(r["loss"]) and 0 <= r["wer"] <= 100 for r in dev), dev
    assert 0 < summary[0]["training_seconds"] < wall
    assert summary[0]["audio_s_per_s"] == pytest.approx(summary[0]["audio_seconds"] / summary[0]["training_seconds"])
    assert "s of audio per second (evaluation and checkpoints excluded)" in (tmp_path / "train.log").read_text()


@pytest.mark.parametrize("waves", [True, False])
def test_stitched_batches_join_utterances_in_order(waves):
    """`u2moe bench train --utt-seconds`: utterances joined in order, audio and transcripts, into
    ones of at least the asked length, batched within the frame budget."""
    from u2moe.data_prep.batching import collate
    from u2moe.configs.data import BatchConfig, DataConfig
    from u2moe.data_prep.features import num_frames
    from u2moe.data_prep.sample_processor import Sample
    from u2moe.bench.train_step import stitch_batches

    data = DataConfig(batch=BatchConfig(type="dynamic", max_frames_in_batch=4000))
    gen = torch.Generator().manual_seed(0)
    originals = []
    for i in range(40):
        seconds = 1.0 + (i % 5) * 0.5
        audio = torch.randn(int(seconds * 16000) if waves else int(seconds * 100), *(() if waves else (80,)),
                            generator=gen)
        frames = num_frames(len(audio), data.fbank, data.sample_rate) if waves else len(audio)
        originals.append(Sample(f"u{i}", frames, seconds, [i % 7 + 1] * (i % 3 + 1),
                                wave=audio if waves else None, feats=None if waves else audio))
    batches = [collate(originals[i:i + 6]) for i in range(0, 40, 6)]  # collate sorts each batch by length
    in_order = [u for i in range(0, 40, 6) for u in sorted(originals[i:i + 6], key=lambda s: -s.num_frames)]
    stitched = stitch_batches(batches, 6.0, data)

    by_key = {u.key: u for u in in_order}
    order = [u.key for u in in_order]
    seen = []
    for batch in stitched:
        audio, lengths = (batch["wavs"], batch["wav_lengths"]) if waves else (batch["feats"], batch["feats_lengths"])
        frames = [num_frames(int(n), data.fbank, data.sample_rate) for n in lengths] if waves else lengths.tolist()
        assert max(frames) * len(frames) <= 4000
        for i, key in enumerate(batch["keys"]):
            parts = [by_key[k] for k in key.split("+")]
            first = order.index(parts[0].key)
            assert [p.key for p in parts] == order[first:first + len(parts)]  # neighbours, in order
            seen += [p.key for p in parts]
            assert batch["durations"][i] == pytest.approx(sum(p.duration for p in parts))
            assert batch["durations"][i] >= 6.0
            assert sum(p.duration for p in parts[:-1]) < 6.0  # joined no further than needed
            source = torch.cat([p.wave if waves else p.feats for p in parts])
            assert torch.equal(audio[i, :lengths[i]], source)
            assert batch["target"][i, :batch["target_lengths"][i]].tolist() == [t for p in parts for t in p.target]
    assert sorted(seen, key=order.index) == order[:len(seen)] and len(seen) > 30  # consecutive, from the start


def test_stitched_batches_take_bucket_shapes_for_bucket_batching():
    """`--utt-seconds` with `data.batch.type: bucket`: the joined utterances come in the loader's
    fixed shapes (what CUDA graphs replay), padded frames and targets masked by their lengths."""
    from u2moe.bench.train_step import stitch_batches
    from u2moe.configs.data import BatchConfig, DataConfig
    from u2moe.data_prep.batching import collate
    from u2moe.data_prep.features import num_frames, samples_for_frames
    from u2moe.data_prep.sample_processor import Sample

    data = DataConfig(batch=BatchConfig(type="bucket", max_frames_in_batch=4000, bucket_frames=200, bucket_tokens=16))
    gen = torch.Generator().manual_seed(0)
    originals = []
    for i in range(60):
        seconds = 1.0 + (i % 7) * 0.4
        wave = torch.randn(int(seconds * 16000), generator=gen)
        originals.append(Sample(f"u{i}", num_frames(len(wave), data.fbank, data.sample_rate), seconds,
                                [i % 7 + 1] * (i % 3 + 1), wave=wave))
    stitched = stitch_batches([collate(originals[i:i + 6]) for i in range(0, 60, 6)], 6.0, data)
    shapes = set()
    for batch in stitched:
        frames = [num_frames(int(n), data.fbank, data.sample_rate) for n in batch["wav_lengths"]]
        padded = -(-max(frames) // 200) * 200
        assert batch["wavs"].shape[1] == samples_for_frames(padded, data.fbank, data.sample_rate)
        assert batch["target"].shape[1] % 16 == 0 and padded * len(frames) <= 4000
        shapes.add(tuple(batch["wavs"].shape))
    assert len(stitched) > len(shapes)  # shapes repeat


def test_bench_train_reads_epochs_and_steps(corpus, tmp_path):
    """`u2moe bench train`: the loader pass covers the whole training set, the steps run (here on
    utterances joined to 3 s)."""
    from test_data_support import read_kaldi_table

    cmd = train_command(corpus, tmp_path / "unused", nproc=1)
    config_args = cmd[cmd.index("--config"):]
    for flag in ("--dev-shards", "--exp-dir"):  # train-only arguments
        i = config_args.index(flag)
        del config_args[i:i + 2]
    out = tmp_path / "bench.json"
    # A process of its own: the bench sets up torch.distributed, as `u2moe train` does.
    run([*cmd[:cmd.index("train")], "bench", "train", *config_args, "--loader-batches", "1000", "--loader-epochs", "2",
         "--steps", "2", "--live-steps", "20", "--profile", "1", "--utt-seconds", "3", "--json", str(out)], timeout=300,
        log=tmp_path / "bench.log")
    result = json.loads(out.read_text())
    root = corpus["train"].parents[1] / "corpus"
    audio = [sf.info(str(root / rel)).duration for rel in read_kaldi_table(root / "train" / "wav.scp").values()]
    # The loader pass reads the corpus twice, epoch after epoch, the second one prefetched.
    assert result["loader_epochs"] == 2 and result["loader_audio_seconds"] == pytest.approx(2 * sum(audio), abs=0.1)
    assert result["loader_first_batch_s"] > 0 and result["loader_epoch_start_wait_s"] > 0
    assert result["loader_audio_s_per_s"] > 0
    assert result["steps"] == 2 and result["step_audio_s_per_s"] > 0 and result["aten_ops_per_step"] > 0
    assert result["step_ms_mean"] == pytest.approx(result["step_ms_median"])  # two steps: the same
    assert result["utt_seconds_mean"] >= 3 and result["batch_audio_s_mean"] >= 3  # steps on joined utterances
    # Live steps run across an epoch end (3 warm-up + 20 steps, more than the epoch's batches),
    # and their time splits into the data wait, the steps and the loop's rest.
    assert result["loader_batches"] / result["loader_epochs"] < 3 + 20
    assert result["live_steps"] == 20 and result["live_audio_s_per_s"] > 0 and result["live_step_ms_mean"] > 0
    assert 0 < result["live_data_wait_frac"] + result["live_in_step_frac"] <= 1
    # The phases of a step (on the CPU their synchronisation removes no overlap): each ran, the
    # engine's three hold most of the step, and with the rest they add up to a step's time as
    # timed without them (another batch of the same size: within a factor of two).
    phases = [result[f"phase_{p}_ms"] for p in ("forward", "backward", "optimizer")]
    assert min(phases) > 0 and 0 < result["phase_other_ms"] < sum(phases)
    assert 0.5 < (sum(phases) + result["phase_other_ms"]) / result["step_ms_mean"] < 2
    assert result["world_size"] == 1


@pytest.mark.parametrize("ds_config", ["zero0_bf16", "zero0_pure_bf16"])
def test_zero0_bf16_resumes_exactly_and_keeps_fp32_weights(corpus, tmp_path, ds_config):
    """No ZeRO, bf16 (ds_configs/zero0_bf16.json: torch.autocast; zero0_pure_bf16.json: the
    whole model in bf16, run by the trainer): a run stopped at step 2 and resumed matches the
    straight run's losses; weights and exported model stay fp32."""
    from u2moe.inference.model_file import load_model_file
    from u2moe.trainer.export import export_model

    extra = ["train.save_interval=2", "train.max_epochs=5", "train.expert_parallel_size=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(train_command(corpus, straight, nproc=1, ds_config=ds_config, extra=[*extra, "train.max_steps=4"]),
        timeout=300, log=tmp_path / "straight.log")
    run(train_command(corpus, split, nproc=1, ds_config=ds_config, extra=[*extra, "train.max_steps=2"]),
        timeout=300, log=tmp_path / "first.log")
    run(train_command(corpus, split, nproc=1, ds_config=ds_config, extra=[*extra, "train.max_steps=4"]),
        timeout=300, log=tmp_path / "resumed.log")
    assert "resumed from step 2" in (tmp_path / "resumed.log").read_text()
    reference, resumed = train_losses(straight), train_losses(split)
    assert sorted(reference) == sorted(resumed) == [1, 2, 3, 4]
    # Expert load per MoE layer and step: fractions of the routed frames, and the logged maximum.
    loads = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    for step in (1, 2, 3, 4):
        rows = [[v for k, v in r.items() if k.startswith("e")] for r in loads
                if r["split"].startswith("expert_load/") and r["step"] == step]
        assert len(rows) == 6 and all(len(row) == 8 and sum(row) == pytest.approx(1.0) for row in rows)
        assert reference[step]["expert_load_max"] == pytest.approx(8 * max(map(max, rows)))
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-6), step
    export_model(split, tmp_path / "model.pt")
    model, _, _ = load_model_file(tmp_path / "model.pt")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def _distributed_job(rank, world, port, queue):
    import torch.distributed as dist

    from u2moe.trainer.distributed import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_PORT=str(port))
    with distributed() as info:
        total = torch.tensor([info.rank + 1.0])
        dist.all_reduce(total)
        inside = dist.is_initialized()
    send_result(queue, rank, (float(total), inside, dist.is_initialized()))


def test_distributed_job_tears_its_process_groups_down():
    """The groups work inside the job and are gone after it (left to interpreter exit, gloo's
    threads abort a finished rank with SIGABRT: spawn_ranks checks every exit status)."""
    results = spawn_ranks(_distributed_job, 2)
    assert results == {0: (3.0, True, False), 1: (3.0, True, False)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_memory_cap_refuses_allocations_past_it():
    from u2moe.trainer.distributed import cap_gpu_memory

    device = torch.device("cuda", 0)
    cap_gpu_memory(device, 1.0)
    try:
        kept = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)  # 0.5 GiB fits
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2**30, dtype=torch.uint8, device=device)
        del kept
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def test_host_threads_are_limited_on_a_gpu_only():
    from u2moe.configs.loading import ConfigError
    from u2moe.trainer.distributed import limit_host_threads

    default = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        limit_host_threads(torch.device("cpu"), 1)  # the model's math runs here: untouched
        assert torch.get_num_threads() == 2
        limit_host_threads(torch.device("cuda", 0), 0)  # 0: torch's default stays
        assert torch.get_num_threads() == 2
        limit_host_threads(torch.device("cuda", 0), 1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(default)
    with pytest.raises(ConfigError, match="host_threads"):
        TrainConfig(host_threads=-1)
    # The trainer leaves them when ZeRO offloads to the host, whose cores then run the optimizer.
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert offloads_to_host(offload) and offloads_to_host({"zero_optimization": {"offload_param": {"device": "nvme"}}})
    assert not offloads_to_host({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}})
    assert offloads_to_host({"zero_optimization": {"stage": 2, "cpu_offload": True}})  # the deprecated spellings
    assert offloads_to_host({"zero_optimization": {"stage": 3, "cpu_offload_param": True}})
    assert not offloads_to_host({"zero_optimization": {"stage": 2, "cpu_offload": False}})
    shipped = Path(__file__).resolve().parents[1] / "ds_configs" / "zero2_bf16.json"
    assert not offloads_to_host(load_ds_config(shipped, TrainConfig(), 1))


def test_cuda_graphs_are_refused_at_start_up_where_they_cannot_run(corpus, tmp_path):
    """`u2moe train` checks train.cuda_graphs' conditions before building anything (here: no
    CUDA device, autocast, dynamic batches) and names them all."""
    cmd = train_command(corpus, tmp_path / "exp", nproc=1, ds_config="zero0_bf16",
                        extra=["train.cuda_graphs=true", "train.max_steps=1", "train.expert_parallel_size=1"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    unmet = ["train.cuda_graphs needs", "no autocast", "data.batch.type: bucket (not dynamic)"]
    for part in unmet + ([] if torch.cuda.is_available() else ["a CUDA device"]):
        assert part in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "exp" / "checkpoints").exists()


@pytest.mark.parametrize("ds_config", ["zero0_bf16", "zero2_bf16"])
def test_a_diverged_run_is_not_checkpointed(corpus, tmp_path, ds_config):
    """A non-finite gradient norm (here from an absurd learning rate) stops the run at the next
    checkpoint instead of writing NaN weights over the good ones: the trainer's norm without ZeRO,
    DeepSpeed's with it (whose bf16 overflow check the shipped configs turn off)."""
    exp = tmp_path / "exp"
    cmd = train_command(corpus, exp, nproc=1, ds_config=ds_config,
                        extra=["optim.lr=1e38", "train.save_interval=3", "train.max_steps=6",
                               "train.expert_parallel_size=1"])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "training diverged; not checkpointing" in proc.stderr
    assert not (exp / "checkpoints").exists() or not any((exp / "checkpoints").glob("step_*"))


@pytest.mark.slow
def test_compiled_layers_train_like_eager_ones(corpus, tmp_path):
    """train.compile: the same losses as the eager model (dropout off: compiled dropout draws
    its own random numbers), and checkpoints that load into an eager model."""
    from u2moe.inference.model_file import load_model_file
    from u2moe.trainer.export import export_model

    extra = [*NO_DROPOUT, "train.max_steps=3", "train.save_interval=3", "train.expert_parallel_size=1"]
    losses = {}
    for compiled in (False, True):
        exp = tmp_path / f"compile_{compiled}"
        run(train_command(corpus, exp, nproc=1, ds_config="zero0_bf16", preset="tiny_dense",
                          extra=[*extra, f"train.compile={str(compiled).lower()}"]),
            timeout=600, log=tmp_path / f"compile_{compiled}.log")
        losses[compiled] = train_losses(exp)
    assert sorted(losses[True]) == [1, 2, 3]
    for step in (1, 2, 3):
        assert losses[True][step]["loss"] == pytest.approx(losses[False][step]["loss"], rel=1e-3), step
    export_model(tmp_path / "compile_True", tmp_path / "model.pt")
    load_model_file(tmp_path / "model.pt")


@pytest.mark.gpu
@pytest.mark.parametrize("preset,gpus,ds_config", [("tiny_dense", 1, "zero0_pure_bf16"), ("tiny_moe", 1, "zero0_pure_bf16"),
                                                   ("tiny_moe", 2, "zero2_bf16")])
def test_cuda_graphs_train_like_eager_layers(corpus, tmp_path, preset, gpus, ds_config):
    """train.cuda_graphs with bucket batches, bf16 on one process (the trainer's whole-model mode)
    and on two under ZeRO-2 (data parallel, every expert on each rank): the eager run's losses
    (dropout off), step by step, through captures of new shapes along the way."""
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPU(s)")
    extra = [*NO_DROPOUT, "train.max_steps=8", "train.expert_parallel_size=1", "data.batch.type=bucket",
             "data.batch.bucket_frames=100"]
    losses = {}
    for graphs in (False, True):
        exp = tmp_path / f"graphs_{graphs}"
        log = tmp_path / f"graphs_{graphs}.log"
        run(train_command(corpus, exp, nproc=gpus, ds_config=ds_config, preset=preset,
                          extra=[*extra, f"train.cuda_graphs={str(graphs).lower()}"]), timeout=600, log=log)
        losses[graphs] = train_losses(exp)
    assert sorted(losses[True]) == list(range(1, 9))
    assert losses[True][8]["cuda_graph_shapes"] > 0  # replays, not only first sightings run eagerly
    for step in range(1, 9):
        assert losses[True][step]["loss"] == pytest.approx(losses[False][step]["loss"], rel=2e-2), step
        # Gradients reduced from mismatched buckets (ranks disagreeing on their order) change the norm.
        assert losses[True][step]["grad_norm"] == pytest.approx(losses[False][step]["grad_norm"], rel=5e-2), step


def _one_process_trainer_inputs(port, corpus, exp_dir, ds_config, sets=()):
    """Config and paths of a one-process tiny_moe trainer without dropout, in a spawned process."""
    from trainer_helpers import TINY
    from u2moe.configs.experiment import load_config
    from u2moe.trainer.train import TrainPaths

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_PORT=str(port))
    cfg = load_config("tiny_moe", [*TINY, *NO_DROPOUT, f"model.vocab_size={corpus['vocab']}",
                                   "train.expert_parallel_size=1", *sets])
    repo = Path(__file__).resolve().parents[1]
    return cfg, TrainPaths(str(corpus["train"]), str(corpus["dev"]), str(corpus["units"]), str(corpus["cmvn"]),
                           exp_dir, str(repo / "ds_configs" / f"{ds_config}.json"))


def _one_process_backward(rank, world, port, queue, corpus, exp_dir):
    import copy

    from op_counting import OpCalls
    from u2moe.trainer.distributed import distributed
    from u2moe.trainer.train import Trainer

    cfg, paths = _one_process_trainer_inputs(port, corpus, exp_dir, "zero0_bf16")
    with distributed() as info:
        trainer = Trainer(cfg, paths, info)
        batch = next(iter(trainer._loader(paths.train_shards, train=True)))
        reference = copy.deepcopy(trainer.model)
        inputs = trainer._inputs(batch, train=True)
        torch.manual_seed(0)  # the same dynamic chunk size in both forwards
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = reference(*inputs)["loss"]
        loss.backward()
        trainer.engine.train()
        torch.manual_seed(0)
        out = trainer.engine(*inputs)
        counter = OpCalls("copy_")
        with counter:
            trainer.engine.backward(out["loss"])
        grads = {n: (p.grad, dict(reference.named_parameters())[n].grad) for n, p in trainer.model.named_parameters()}
        compute_weights = trainer.compute_weights is not None
    send_result(queue, rank, (grads, counter.calls, compute_weights))


def test_one_process_backward_is_plain_autograd_without_per_parameter_copies(corpus, tmp_path):
    """One process, no ZeRO: the engine's backward gives the gradients of a plain autograd
    backward, without DeepSpeed's bucket-and-copy-back reduction (one copy per parameter), which
    a host-bound step pays for in launches."""
    grads, copies, compute_weights = spawn_ranks(_one_process_backward, 1, corpus, tmp_path / "exp")[0]
    assert len(grads) > 50 and copies < len(grads) // 4
    assert compute_weights  # one process, no ZeRO, bf16 autocast: trainer/compute_weights.py
    for name, (got, want) in grads.items():
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def _boundary_grads(rank, world, port, queue, corpus, exp_dir, ds_config, sets, micro_batches):
    import copy

    from test_compute_weights import _bf16_reference
    from u2moe.trainer.distributed import distributed
    from u2moe.trainer.train import Trainer

    cfg, paths = _one_process_trainer_inputs(port, corpus, exp_dir, ds_config,
                                             [f"train.accum_grad={micro_batches}", *sets])
    with distributed() as info:
        trainer = Trainer(cfg, paths, info)
        batches = iter(trainer._loader(paths.train_shards, train=True))
        inputs = [trainer._inputs(next(batches), train=True) for _ in range(micro_batches)]
        pure = ds_config == "zero0_pure_bf16"
        trainer.engine.train()
        reference = copy.deepcopy(trainer.model)
        for module in reference.modules():  # plain autograd: no activation checkpointing
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = False
        reference = _bf16_reference(reference) if pure else reference
        want: dict[str, torch.Tensor] = {}
        for feats, *rest in inputs:  # DeepSpeed divides each micro-batch's loss by the accumulation steps
            torch.manual_seed(0)  # the same dynamic chunk size in both forwards
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not pure):
                loss = reference(feats, *rest)["loss"]
            (loss / micro_batches).backward()
            for name, param in reference.named_parameters():  # summed in fp32 (a bf16 model's grads are bf16)
                want[name] = want[name] + param.grad.float() if name in want else param.grad.float()
            reference.zero_grad(set_to_none=True)
        seen = {}

        def snapshot():  # the trainer clips at the boundary, before the optimizer step
            seen.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
            return None

        trainer.clipper = snapshot
        stepped = []
        for batch_inputs in inputs:
            trainer._inputs = lambda batch, train, given=batch_inputs: given
            torch.manual_seed(0)
            stepped.append(trainer.train_step({})[1])
        grads = {n: (seen[n], want[n]) for n in want}
        used = trainer.compute_weights is not None
    send_result(queue, rank, (grads, stepped, used))


@pytest.mark.parametrize("ds_config", ["zero0_bf16", "zero0_pure_bf16"])
@pytest.mark.parametrize("sets,micro_batches", [
    ([], 2),
    (["model.encoder.gradient_checkpointing=true", "model.decoder.gradient_checkpointing=true"], 1)])
def test_one_process_bf16_step_gives_plain_autograds_gradients(corpus, tmp_path, ds_config, sets, micro_batches):
    """One process, no ZeRO, on the trainer's bf16 compute weights: the gradients at the
    accumulation boundary are those of plain autograd (autocast's, or the bf16-held model's
    widened), bit for bit: two micro-batches summed in fp32 (train.accum_grad=2), and with
    activation checkpointing, whose recomputation in the backward must run on the same weights."""
    grads, stepped, used = spawn_ranks(_boundary_grads, 1, corpus, tmp_path / "exp", ds_config, sets,
                                       micro_batches)[0]
    assert used and stepped == [False] * (micro_batches - 1) + [True]
    for name, (got, want) in grads.items():
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_step_clock_estimates_the_time_left_from_this_run_s_steps(monkeypatch):
    from u2moe.trainer import progress

    now = [50.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    clock = progress.StepClock(first_step=100, max_steps=400)  # resumed at step 100
    assert clock.eta_seconds(100) is None
    now[0] = 80.0  # 30 s for 20 steps: 1.5 s a step, 280 steps to go
    assert clock.eta_seconds(120) == pytest.approx(420.0)
    assert progress.format_duration(420.0) == "7m00s" and progress.format_duration(3725.4) == "1h02m"
    assert progress.StepClock(0, max_steps=0).eta_seconds(10) is None


def test_a_cosine_schedule_without_a_step_limit_is_refused_before_anything_is_built():
    from u2moe.configs.experiment import load_config
    from u2moe.configs.loading import ConfigError
    from u2moe.trainer.distributed import DistInfo
    from u2moe.trainer.engine import refuse_incompatible

    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    cfg = load_config("tiny_moe", ["optim.schedule=cosine"])
    with pytest.raises(ConfigError, match="train.max_steps"):
        refuse_incompatible(cfg, {}, "ds.json", info)
    cfg.train.max_steps = 100  # as --max-steps sets it
    refuse_incompatible(cfg, {}, "ds.json", info)
    with pytest.raises(ConfigError, match="optim.schedule"):
        load_config("tiny_moe", ["optim.schedule=linear"])
