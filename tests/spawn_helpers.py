"""Multi-process tests on CPU: free ports and spawned ranks that send their results back."""
from __future__ import annotations

import io
import socket
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send_result(queue: Any, rank: int, result: Any) -> None:
    """For a worker: ship `result` to the test as bytes (tensors shared through file
    descriptors would die with the worker process)."""
    buffer = io.BytesIO()
    torch.save(result, buffer)
    queue.put((rank, buffer.getvalue()))


def spawn_ranks(worker: Callable, world: int, *args: Any, timeout: float = 300) -> dict[int, Any]:
    """Run worker(rank, world, port, queue, *args) in `world` spawned processes; each calls
    `send_result` once. Returns {rank: result}; every process must exit cleanly."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(rank, world, port, queue, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        rank, payload = queue.get(timeout=timeout)
        results[rank] = torch.load(io.BytesIO(payload))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results
