"""Counting one ATen operator's calls in a block of code (host syncs, casts, copies per step)."""
from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class OpCalls(TorchDispatchMode):
    """`with OpCalls("nonzero") as c: ...` -> c.calls, the operator's calls inside the block."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.overloadpacket.__name__ == self.name
        return func(*args, **(kwargs or {}))
