"""`u2moe bench streams`: the capacity search against known latency curves, and a CPU run."""
import json

import pytest

from u2moe.__main__ import build_parser
from u2moe.bench.streams import Latency, Point, find_capacity, nearest_rank, run_streams


def _linear_device(ms_per_stream: float, memory_streams: int | None = None):
    """A device whose step takes ms_per_stream per stream and holds at most memory_streams."""
    tried = []

    def measure(streams: int) -> Point:
        tried.append(streams)
        if memory_streams is not None and streams > memory_streams:
            return Point(streams, None)
        seconds = streams * ms_per_stream / 1000
        return Point(streams, Latency(seconds, seconds, 10))

    return measure, tried


@pytest.mark.parametrize("ms_per_stream", [0.7, 3.0, 50.0])
def test_capacity_is_the_most_streams_under_the_budget_within_the_precision(ms_per_stream):
    measure, tried = _linear_device(ms_per_stream)
    cap = find_capacity(measure, budget=0.64, max_streams=10_000, precision=1 / 16)
    true = max(b for b in range(1, 10_000) if b * ms_per_stream / 1000 < 0.64)  # 914, 213, 12
    assert cap.limited_by == "time"
    assert true / (1 + 1 / 16) <= cap.streams <= true
    assert cap.latency.p99 < 0.64 and cap.budget == 0.64
    assert tried[:3] == [1, 2, 4] and len(tried) == len(set(tried)) < 25
    assert [p.streams for p in cap.points] == sorted(tried)


def test_capacity_stops_at_memory_and_at_the_largest_batch_asked():
    measure, _ = _linear_device(0.1, memory_streams=300)
    cap = find_capacity(measure, budget=0.64, max_streams=10_000, precision=1 / 16)
    assert cap.limited_by == "memory" and 300 / (1 + 1 / 16) <= cap.streams <= 300
    measure, tried = _linear_device(0.1)
    cap = find_capacity(measure, budget=0.64, max_streams=100, precision=1 / 16)
    assert cap.limited_by == "max-streams" and cap.streams == 100 and tried[-1] == 100
    measure, _ = _linear_device(1000.0)
    cap = find_capacity(measure, budget=0.64, max_streams=100, precision=1 / 16)
    assert cap.streams == 0 and cap.latency is None and cap.limited_by == "time"


def test_nearest_rank_percentiles():
    samples = [float(v) for v in range(1, 201)]
    assert nearest_rank(samples, 0.5) == 100 and nearest_rank(samples, 0.99) == 198
    assert nearest_rank([3.0, 1.0, 2.0], 0.99) == 3.0


def test_streams_bench_runs_on_cpu_with_tiny_presets(tmp_path, capsys):
    # A generous budget: this checks what is measured and reported, not this machine's speed.
    out = tmp_path / "streams.json"
    args = build_parser().parse_args([
        "bench", "streams", "--configs", "tiny_dense,tiny_moe", "--device", "cpu", "--dtype", "fp32",
        "--modes", "eager", "--chunk-size", "4", "--left-chunks", "2", "--steps", "3", "--max-streams", "4",
        "--budget-ms", "60000", "--json", str(out)])
    results = run_streams(args)
    saved = json.loads(out.read_text())
    for preset in ("tiny_dense", "tiny_moe"):
        cap = results[preset]["eager"]
        assert cap.streams == 4 and cap.limited_by == "max-streams" and cap.budget == 60.0
        assert 0 < cap.latency.p50 <= cap.latency.p99 < cap.budget
        assert [p.streams for p in cap.points] == [1, 2, 4]
        assert all(p.latency.steps == 3 and p.latency.p50 > 0 for p in cap.points)
        assert saved[preset]["eager"]["streams"] == 4
        assert saved[preset]["eager"]["latency"]["p99"] == pytest.approx(cap.latency.p99)
    table = capsys.readouterr().out
    assert "| tiny_moe | eager | 4 |" in table and "p99 budget 60000 ms" in table


def test_graphed_streams_need_cuda():
    args = build_parser().parse_args(["bench", "streams", "--configs", "tiny_dense", "--device", "cpu",
                                      "--dtype", "fp32", "--modes", "graphed", "--max-streams", "1"])
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        run_streams(args)
