"""What a process's idle OpenMP threads cost: CPU time per second of wall time of a loop that runs
one small parallel CPU op (past torch's parallel grain) and then works elsewhere for a while, as a
GPU training process does between two batches' host-side ops.

    python -m u2moe.bench.omp_spin [--threads 1,0] [--gaps-ms 5,20,100] [--elements 40000]

--threads 0 is torch's default (one per core). With more than one thread, the op's pool threads
spin-wait after each parallel region before they sleep (libgomp), so the process burns cores
doing nothing; with one thread it uses only what the op needs. The gap is spent in time.sleep
(a stand-in for kernel launches: the pool threads are idle either way).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def cpu_per_wall(threads: int, gap_s: float, elements: int, iterations: int) -> float:
    torch.set_num_threads(threads or os.cpu_count() or 1)
    x = torch.arange(elements)
    cpu0, wall0 = os.times(), time.perf_counter()
    for _ in range(iterations):
        torch.ge(x, 7).logical_and_(x < elements // 2)  # two parallel element-wise regions
        time.sleep(gap_s)
    cpu1, wall = os.times(), time.perf_counter() - wall0
    return (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,0", help="comma-separated; 0 = torch's default (one per core)")
    p.add_argument("--gaps-ms", default="5,20,100")
    p.add_argument("--elements", type=int, default=40000, help="op size (torch's grain is 32768)")
    p.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    args = p.parse_args()
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        for gap_ms in (float(g) for g in args.gaps_ms.split(",")):
            iterations = max(1, int(args.seconds * 1000 / gap_ms))
            used = cpu_per_wall(threads, gap_ms / 1000, args.elements, iterations)
            rows.append({"threads": torch.get_num_threads(), "gap_ms": gap_ms, "cpu_cores_busy": round(used, 2)})
            print(json.dumps(rows[-1]))


if __name__ == "__main__":
    main()
