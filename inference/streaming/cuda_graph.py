"""The fixed-shape chunk step (fixed_stream.py) captured as a CUDA graph and replayed.

A streaming step is host work on a GPU: every layer launches a few dozen small kernels (an MoE
layer its router, sort, gathers, grouped products and combine), so a batch of streams waits on
Python and the launch queue rather than on the GPU. A graph launches the whole step at once.
What a graph holds is fixed: shapes, addresses and no host reads, which is what the fixed-shape
step provides; its inputs are copied into static buffers and its outputs are static buffers,
overwritten by the next replay.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ...model.encoder import ConformerEncoder
from ...model.moe.backends import GEMMS, backend_override, select_backend
from .fixed_stream import FixedShapeStream


class CapturedStep:
    """fn(*inputs) -> tuple of tensors, captured for inputs shaped as `examples` and replayed by
    each call. fn may update state in place (a stream's caches): the warm-up runs do too."""

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], examples: Sequence[torch.Tensor],
                 warmup: int = 2):
        with torch.inference_mode(False):  # static inputs stay writable outside inference mode
            self.inputs = tuple(x.detach().clone() for x in examples)
        # Warm-up off the capture, on a side stream as capture wants: kernels are chosen and
        # lazily made state (cuBLAS handles, Triton compilations) exists before the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        # The capture draws on a pool of its own: the warm-up's cached blocks, unusable there,
        # would only stand in its way where memory is tight.
        torch.cuda.empty_cache()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for static, x in zip(self.inputs, inputs):
            static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.outputs


def refuse_ungraphable(encoder: ConformerEncoder) -> None:
    """A ValueError unless the encoder's chunk step can be captured: on CUDA, and with MoE
    experts on a backend that needs no group sizes on the host."""
    weight = encoder.after_norm.weight
    if weight.device.type != "cuda":
        raise ValueError(f"CUDA graphs need the model on a CUDA device, not {weight.device}")
    for layer in encoder.moe_ffns:
        experts = layer.experts
        backend = select_backend(experts.backend, weight.device, weight.dtype, tuple(experts.w1.shape[1:]))
        if experts.backend == "export" or GEMMS[backend].reads_host:
            raise ValueError(f"CUDA graphs need an expert backend without host reads (grouped_mm or triton: "
                             f"bf16 on sm80 or newer); in {weight.dtype} the experts run on {experts.backend!r} "
                             f"-> {backend!r} (U2MOE_EXPERT_BACKEND={backend_override()})")


class GraphedStream:
    """A `FixedShapeStream` whose step replays a CUDA graph (a `ChunkStep`). The step's outputs
    are the graph's buffers: read them before the next step."""

    def __init__(self, stream: FixedShapeStream):
        refuse_ungraphable(stream.encoder)
        self.stream = stream
        self.encoder, self.geometry, self.batch_size = stream.encoder, stream.geometry, stream.batch_size
        weight = stream.encoder.after_norm.weight
        window = weight.new_zeros(stream.batch_size, self.geometry.window, stream.encoder.cfg.input_size)
        num_valid = torch.full((stream.batch_size,), self.geometry.chunk_size, device=weight.device)
        self.captured = CapturedStep(stream.step, (window, num_valid))
        stream.reset()  # the warm-up steps filled the caches

    def reset(self, streams: torch.Tensor | None = None) -> None:
        self.stream.reset(streams)

    def step(self, window: torch.Tensor, num_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, valid = self.captured(window, num_valid)
        return out, valid


class StreamGraphs:
    """Graphed streams of one encoder and chunk setting, one per batch size, captured when that
    batch size first comes (a decoding run's last batch is usually smaller)."""

    def __init__(self, encoder: ConformerEncoder, chunk_size: int, num_left_chunks: int):
        if chunk_size <= 0 or num_left_chunks < 0:
            raise ValueError("CUDA graphs of the chunk step need streaming with a bounded left context: "
                             f"--chunk-size > 0 and --left-chunks >= 0, got {chunk_size} and {num_left_chunks}")
        refuse_ungraphable(encoder)
        self.encoder, self.chunk_size, self.num_left_chunks = encoder, chunk_size, num_left_chunks
        self.streams: dict[int, GraphedStream] = {}

    def stream(self, batch_size: int) -> GraphedStream:
        if batch_size not in self.streams:
            self.streams[batch_size] = GraphedStream(
                FixedShapeStream(self.encoder, batch_size, self.chunk_size, self.num_left_chunks))
        return self.streams[batch_size]
