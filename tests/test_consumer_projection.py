"""bench/consumer_projection.py: kernel time read from a profiler trace by class, and the step
projected to a slower card, against hand-computed values."""
import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "consumer_projection.py"
spec = importlib.util.spec_from_file_location("consumer_projection", SCRIPT)
projection = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = projection  # for its dataclass
spec.loader.exec_module(projection)


def write_run(tmp_path: Path, name: str, wall_ms: float, kernels: list[tuple[str, str, float]]) -> tuple[Path, Path]:
    """A bench train --json result of 2 profiled steps and its gzipped trace with these (category,
    name, microseconds) events."""
    result = tmp_path / f"{name}.json"
    result.write_text(json.dumps({"step_ms_mean": wall_ms, "profile_steps": 2}))
    trace = tmp_path / f"{name}.trace.json.gz"
    events = [{"cat": cat, "name": kernel, "dur": us, "ph": "X"} for cat, kernel, us in kernels]
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return result, trace


def test_kernels_are_split_into_tensor_core_and_other_per_step(tmp_path):
    paths = write_run(tmp_path, "moe", 100.0, [
        ("kernel", "nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN", 30_000),
        ("kernel", "_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm", 10_000),
        ("kernel", "fmha_cutlassB_bf16_aligned_128x128_k128_dropout_sm80", 4_000),
        ("kernel", "sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32", 2_000),
        ("kernel", "void at::native::vectorized_elementwise_kernel<8, silu_backward_kernel>", 6_000),
        ("gpu_memcpy", "Memcpy DtoD (Device -> Device)", 1_000),
        ("gpu_memset", "Memset (Device)", 1_000),
        ("kernel", "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 500_000),  # waiting for the peer
        ("cpu_op", "aten::mm", 90_000),
    ])
    run = projection.read_profile("moe_1b", *paths)
    assert run.wall_ms == 100.0
    assert run.tensor_core_ms == pytest.approx(46 / 2)
    assert run.other_ms == pytest.approx(8 / 2)


def test_projection_bounds_and_ratios(tmp_path):
    step = projection.StepProfile("a", wall_ms=100.0, tensor_core_ms=20.0, other_ms=10.0)
    # Kernels 6x and 3.3x slower: 120 + 33 = 153 ms of GPU time; overlapped it paces the step,
    # serial it adds its 123 ms of growth to the host-paced 100.
    assert step.projected_ms(6.0, 3.3) == pytest.approx((153.0, 223.0))
    assert step.projected_ms(1.0, 1.0) == (100.0, 100.0)  # the measured card: the measured step

    small = write_run(tmp_path, "small", 50.0, [("kernel", "nvjet_gemm", 20_000), ("kernel", "elementwise", 20_000)])
    big = write_run(tmp_path, "big", 100.0, [("kernel", "nvjet_gemm", 160_000), ("kernel", "elementwise", 20_000)])
    runs = [projection.read_profile("small", *small), projection.read_profile("big", *big)]
    table = projection.projection_table(runs, "h100", "h100").splitlines()
    assert table[-1].endswith("| 2.00x | 2.00x - 2.00x |")  # the card it ran on: the measured ratio
    # rtx4090: small 10*5.99 + 10*3.32 = 93.1 ms overlapped, big 80*5.99 + 10*3.32 = 512.3.
    ratio = 80 * (989.4 / 165.2) + 10 * (3350 / 1008)
    ratio /= 10 * (989.4 / 165.2) + 10 * (3350 / 1008)
    assert f"| 2.00x | {ratio:.2f}x - " in projection.projection_table(runs, "h100", "rtx4090").splitlines()[-1]
