"""Model FLOPs (model/flops.py) against torch's FlopCounterMode on the real forward pass."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from u2moe.configs.experiment import load_config
from u2moe.model import U2Model
from u2moe.model.flops import forward_flops, peak_tflops, training_flops


@pytest.mark.parametrize("preset,sets", [("tiny_dense", []), ("tiny_moe", []),
                                         ("tiny_moe", ["model.encoder.subsampling_channels=32"])])
@pytest.mark.parametrize("frames,tokens", [(203, 7), (480, 12)])
def test_forward_flops_match_torch_flop_counter(preset, sets, frames, tokens):
    cfg = load_config(preset, ["model.encoder.use_dynamic_chunk=false", *sets]).model
    torch.manual_seed(0)
    model = U2Model(cfg).train()
    feats = torch.randn(1, frames, cfg.encoder.input_size)
    target = torch.randint(1, cfg.vocab_size - 1, (1, tokens))
    with FlopCounterMode(display=False) as counter:
        model(feats, torch.tensor([frames]), target, torch.tensor([tokens]))
    assert forward_flops(cfg, frames, tokens) == counter.get_total_flops()


def test_training_flops_sum_utterances_and_peaks_by_name():
    cfg = load_config("tiny_moe").model
    assert training_flops(cfg, [300, 500], [5, 9]) == 3 * (forward_flops(cfg, 300, 5) + forward_flops(cfg, 500, 9))
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("NVIDIA A10") == 125.0
    assert peak_tflops("NVIDIA GeForce RTX 4090") == 165.2 and peak_tflops("cpu") is None


def test_throughput_meter_reports_tflops_and_mfu(monkeypatch):
    from u2moe.trainer import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    meter = progress.ThroughputMeter(torch.device("cpu"), peak_tflops=4.0, comm_seconds=lambda: 0.5)
    meter.add(10.0, {"loss": torch.tensor(2.0)}, 0.5, flops=3 * 10**12, step_seconds=0.3)
    meter.add(30.0, {"loss": torch.tensor(4.0)}, 0.5, flops=1 * 10**12, step_seconds=0.5)
    now[0] = 102.0
    stats = meter.report()
    assert stats["data_wait_frac"] == pytest.approx(0.5) and stats["in_step_frac"] == pytest.approx(0.4)
    assert stats["tflops_per_gpu"] == pytest.approx(2.0) and stats["mfu"] == pytest.approx(0.5)
    assert stats["audio_s_per_s"] == pytest.approx(20.0) and stats["loss"] == pytest.approx(3.0)
    assert stats["all_to_all_share"] == pytest.approx(0.25)
