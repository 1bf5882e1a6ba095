"""A training step measured on one GPU (`u2moe bench train --profile`), projected to a slower card.

On an H100 these steps are mostly host work (launches, autograd, ZeRO's per-parameter hooks): the
kernels fill a quarter to a half of the wall time. A card with less arithmetic and bandwidth behind
the same host stretches only the kernels: tensor-core ones (GEMMs, grouped GEMMs, convolutions as
implicit GEMMs, fused attention) by the ratio of the two cards' dense bf16 throughput, the rest
(element-wise, reductions, copies, normalisation, the optimizer) by the ratio of their memory
bandwidth. The projected step lies between two bounds:
- overlapped: max(measured wall, stretched kernel time), the host launching while the GPU works;
- serial: measured wall plus the time the kernels gain, no overlap at all.
NCCL kernels are left out (their time is mostly waiting for the peer rank), and with them what a
consumer card's PCIe link adds to ZeRO's gradient traffic: a projection of compute, not of a node.

  python -m u2moe.bench.consumer_projection --card rtx4090 \\
      --run moe_1b moe.json moe.trace.json.gz --run dense_225m d225.json d225.trace.json.gz ...

Each --run is a preset's `--json` output and the trace written next to it (from any run of the
same preset and batch: kernel times hardly move between hosts, wall times do). The first run is
the one the others are compared with.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

# Dense bf16 tensor throughput (TFLOP/s, fp32 accumulation, no sparsity) and memory bandwidth
# (GB/s), from NVIDIA's data sheets and architecture whitepapers (H100 SXM5, Ada, Ampere GA102).
CARDS = {
    "h100": (989.4, 3350.0),
    "rtx4090": (165.2, 1008.0),
    "rtx3090": (71.0, 936.0),
}
TENSOR_CORE_KERNEL = re.compile(r"gemm|nvjet|cutlass|xmma|fmha|flash|matmul", re.IGNORECASE)


@dataclass(frozen=True)
class StepProfile:
    name: str
    wall_ms: float  # the unprofiled step, mean over the bench's steps
    tensor_core_ms: float  # kernel time per profiled step
    other_ms: float

    def projected_ms(self, compute_ratio: float, bandwidth_ratio: float) -> tuple[float, float]:
        """(overlapped, serial) step time on a card that many times slower."""
        kernels = self.tensor_core_ms * compute_ratio + self.other_ms * bandwidth_ratio
        return max(self.wall_ms, kernels), self.wall_ms + kernels - self.tensor_core_ms - self.other_ms


def read_profile(name: str, result_json: Path, trace: Path) -> StepProfile:
    result = json.loads(result_json.read_text())
    opener = gzip.open if trace.suffix == ".gz" else open
    with opener(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    tensor_core = other = 0.0
    for event in events:
        if event.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset") or event["name"].startswith("nccl"):
            continue
        if TENSOR_CORE_KERNEL.search(event["name"]):
            tensor_core += event["dur"]
        else:
            other += event["dur"]
    steps = result["profile_steps"]
    return StepProfile(name, result["step_ms_mean"], tensor_core / 1000 / steps, other / 1000 / steps)


def projection_table(runs: list[StepProfile], measured: str, card: str) -> str:
    compute_ratio = CARDS[measured][0] / CARDS[card][0]
    bandwidth_ratio = CARDS[measured][1] / CARDS[card][1]
    base = runs[0]
    base_over, base_serial = base.projected_ms(compute_ratio, bandwidth_ratio)
    lines = [f"{card}: tensor-core kernels x{compute_ratio:.2f}, other kernels x{bandwidth_ratio:.2f} "
             f"against {measured}",
             f"| preset | wall on {measured} (ms) | tensor-core / other kernels (ms) | projected step, "
             f"overlapped - serial (ms) | {base.name} throughput over it, {measured} | projected |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        over, serial = run.projected_ms(compute_ratio, bandwidth_ratio)
        lines.append(f"| {run.name} | {run.wall_ms:.0f} | {run.tensor_core_ms:.1f} / {run.other_ms:.1f} | "
                     f"{over:.0f} - {serial:.0f} | {run.wall_ms / base.wall_ms:.2f}x | "
                     f"{over / base_over:.2f}x - {serial / base_serial:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs=3, action="append", required=True, metavar=("NAME", "JSON", "TRACE"),
                        help="a preset's bench train --json output and its profiler trace")
    parser.add_argument("--measured-on", choices=sorted(CARDS), default="h100")
    parser.add_argument("--card", choices=sorted(CARDS), action="append",
                        help="card(s) to project to (default: rtx4090 and rtx3090)")
    args = parser.parse_args()
    runs = [read_profile(name, Path(result), Path(trace)) for name, result, trace in args.run]
    for card in args.card or ["rtx4090", "rtx3090"]:
        print(projection_table(runs, args.measured_on, card), end="\n\n")


if __name__ == "__main__":
    main()
