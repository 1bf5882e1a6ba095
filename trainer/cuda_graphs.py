"""CUDA graphs of the training step's layer stacks, one per batch shape (`train.cuda_graphs`).

On a GPU the small presets' steps are bound by the host: thousands of kernels, each paid in
Python, autograd and launch time, leave the GPU idle for most of a step (docs/results.md).
A graph replays the encoder's (or a decoder's) whole forward, or backward, in one launch. What a
graph holds is fixed: tensor shapes and addresses, and no host reads. So the batches come in a
few fixed shapes (`data.batch.type: bucket`), the MoE layers keep padded frames in place,
skipped, instead of removing them (`U2Model.use_static_shapes`), and each stack keeps one
graph pair per shape, captured the second time the shape comes (a few tenths of a second) and
replayed after that.
A stack's graphs of all its shapes draw on one memory pool: a shape's saved activations and
temporaries live only from its forward replay to the end of its backward replay, and the stack
runs each forward's backward before its next replay (one forward and backward per micro-batch),
so the shapes can reuse each other's memory. The parameters' gradients of every shape land in
one set of buffers too (a copy at the end of the backward graph), since autograd copies them out
before the next replay. What a graph keeps to itself is its inputs, output and input gradients.
A pool and gradient buffers per shape would hold one set of activations and one model's worth
of gradients per shape, which at the 1B presets' batches fills a card with a handful of shapes.
Everything else of the step (features, embeddings, masks, CTC and attention losses, optimizer,
and ZeRO's gradient reduction, which runs from the parameters' gradient hooks after the replay)
stays eager.

The replay is one autograd node whose inputs are the stack's inputs and parameters: gradients
reach the parameters (or the trainer's bf16 compute weights, which the graph was captured on)
as in eager mode, through autograd. An eager run of a stack (a shape's first sighting) is one
such node too (`_Eager`), so that gradients reach the parameters in the same order either way,
which data parallelism under ZeRO needs (ranks see different shapes). Dropout draws new masks at
every replay (CUDA graphs advance the generator's offset); batch norm statistics update in place.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..configs.loading import ConfigError
from ..model.asr_model import U2Model
from ..model.moe.backends import GEMMS, backend_override, select_backend
from .ds_config import autocast_dtype, precision

RunLayers = Callable[..., torch.Tensor]


class _StackGraph:
    """A layer stack's forward and backward, captured for one set of input shapes."""

    def __init__(self, run: RunLayers, layers: nn.Module, args: Sequence[torch.Tensor], warmup: int,
                 pool: tuple[int, int], param_grads: Sequence[torch.Tensor | None]):
        self.params = tuple(layers.parameters())
        self.inputs = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        # Captured on fresh leaves that share the parameters' memory: the parameters themselves
        # may still have gradient accumulators from an eager step, made on another stream, and
        # a capture that reached them would make that stream wait on the capturing one (an error).
        aliases = _leaves(self.params)
        leaves = (*self.inputs, *aliases)
        with _holding(layers, dict(zip(map(id, self.params), aliases))):
            # Warm-up runs, off the capture: cuDNN/cuBLAS choose their kernels, lazy state is made.
            torch.cuda.synchronize()
            with torch.cuda.stream(torch.cuda.Stream()):
                for _ in range(warmup):
                    out = run(*self.inputs)
                    _leaf_grads(out, leaves, torch.ones_like(out))
                    # Kept, its graph would hand the aliases' accumulators, made on this side
                    # stream, to the capture (autograd warns of the stream mismatch).
                    del out
            torch.cuda.synchronize()
            self.forward_graph, self.backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            # thread_local: the data loader's pin-memory thread keeps calling CUDA meanwhile.
            with torch.cuda.graph(self.forward_graph, pool=pool, capture_error_mode="thread_local"):
                output = run(*self.inputs)
            self.grad_output = torch.empty_like(output)
            with torch.cuda.graph(self.backward_graph, pool=pool, capture_error_mode="thread_local"):
                grads = _leaf_grads(output, leaves, self.grad_output)
                # One multi-tensor copy: a copy per parameter would add hundreds of kernels.
                copies = [(shared, grad) for shared, grad in zip(param_grads, grads[len(self.inputs):])
                          if grad is not None]
                torch._foreach_copy_([shared for shared, _ in copies], [grad for _, grad in copies])
        # The captured autograd graph and the captured gradients are not needed after the
        # capture: their memory is the pool's, for the other shapes' captures to reuse.
        self.grads = (*grads[:len(self.inputs)], *(shared if grad is not None else None
                                                   for shared, grad in zip(param_grads, grads[len(self.inputs):])))
        self.output = output.detach()

    def load(self, args: Sequence[torch.Tensor]) -> None:
        for static, arg in zip(self.inputs, args):
            static.copy_(arg)


def _leaves(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Fresh autograd leaves sharing the tensors' memory (gradients flow to them, not to the tensors)."""
    return [t.detach().requires_grad_(t.requires_grad) for t in tensors]


def _leaf_grads(output: torch.Tensor, leaves: Sequence[torch.Tensor],
                grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The gradient of each leaf (an input or parameter), None where it takes none or none flows:
    the slots the replay and eager nodes return."""
    grads = iter(torch.autograd.grad(output, [t for t in leaves if t.requires_grad], grad_output, allow_unused=True))
    return tuple(next(grads) if t.requires_grad else None for t in leaves)


@contextmanager
def _holding(layers: nn.Module, replacements: dict[int, torch.Tensor]) -> Iterator[None]:
    """The modules of `layers` hold replacements[id(p)] in place of each parameter p."""
    slots = [(m, name, p) for m in layers.modules() for name, p in m._parameters.items()
             if p is not None and id(p) in replacements]
    for module, name, param in slots:
        module._parameters[name] = replacements[id(param)]
    try:
        yield
    finally:
        for module, name, param in slots:
            module._parameters[name] = param


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graph: _StackGraph, *inputs_and_params: torch.Tensor) -> torch.Tensor:
        graph.load(inputs_and_params[:len(graph.inputs)])
        graph.forward_graph.replay()
        ctx.graph = graph
        # The graph's own output buffer (the next replay overwrites it): each stack replays once
        # per step, and everything that reads this output runs before that.
        return graph.output.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        graph = ctx.graph
        graph.grad_output.copy_(grad)
        graph.backward_graph.replay()
        # The graph's buffers themselves, still referenced here: autograd copies them into .grad
        # rather than adopting them, so gradient accumulation never adds a buffer to itself.
        return (None, *graph.grads)


class _Eager(torch.autograd.Function):
    """A stack's eager run as one autograd node with a replay's inputs, so that its parameters
    receive their gradients in the replay's order. Under ZeRO that order decides which gradients
    share a reduction bucket, and every rank must follow the same one: a rank that runs a shape
    eagerly (its first sighting) while another replays would reduce mismatched buckets, or hang."""

    @staticmethod
    def forward(ctx, run: RunLayers, layers: nn.Module, num_inputs: int, *inputs_and_params: torch.Tensor):
        params = inputs_and_params[num_inputs:]
        leaves = _leaves(inputs_and_params)
        with torch.enable_grad(), _holding(layers, dict(zip(map(id, params), leaves[num_inputs:]))):
            ctx.output = run(*leaves[:num_inputs])
        ctx.leaves = leaves
        return ctx.output.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grads = _leaf_grads(ctx.output, ctx.leaves, grad)
        del ctx.output, ctx.leaves
        return (None, None, None, *grads)


class GraphedLayers:
    """Stands in for a stack's `run_layers` in training (`set_layer_runner`): replays the graph of
    the inputs' shapes, captured when the shape comes the second time; runs eagerly the first
    time, and for any shape beyond `max_shapes`."""

    def __init__(self, run: RunLayers, layers: nn.Module, max_shapes: int, warmup: int = 2):
        self.run, self.layers, self.max_shapes, self.warmup = run, layers, max_shapes, warmup
        self.graphs: dict[tuple, _StackGraph] = {}
        self.seen: set[tuple] = set()
        self.eager_calls = 0
        # Shared by this stack's graphs, made at the first capture.
        self.pool: tuple[int, int] | None = None
        self.param_grads: list[torch.Tensor | None] = []

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = tuple((a.shape, a.dtype, a.requires_grad) for a in args)
        graph = self.graphs.get(key)
        if graph is None:
            # A shape is captured when it comes back: one-off shapes (an epoch's last batches)
            # would each cost a capture and its memory for one use.
            if key not in self.seen or len(self.graphs) >= self.max_shapes or not torch.is_grad_enabled():
                self.seen.add(key)
                self.eager_calls += 1
                if not torch.is_grad_enabled():
                    return self.run(*args)
                return _Eager.apply(self.run, self.layers, len(args), *args, *self.layers.parameters())
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
                self.param_grads = [torch.empty_like(p) if p.requires_grad else None for p in self.layers.parameters()]
            graph = self.graphs[key] = _StackGraph(self.run, self.layers, args, self.warmup, self.pool,
                                                   self.param_grads)
        # Parameters as they are now: the graph read the ones it was captured with; were the
        # modules holding other tensors (an unswapped compute weight), it would silently use stale ones.
        params = tuple(self.layers.parameters())
        if any(p is not q for p, q in zip(params, graph.params)):
            raise RuntimeError("CUDA graph replayed on other parameter tensors than it was captured with")
        return _Replay.apply(graph, *args, *params)


def install(model: U2Model, max_shapes: int) -> list[GraphedLayers]:
    """Graph the encoder's and each decoder's layers (training only) and keep the MoE layers'
    shapes static. Returns the runners (their capture counts are the run's to report)."""
    model.use_static_shapes()
    runners = []
    for owner, layers in model.layer_stacks():
        runner = GraphedLayers(owner.run_layers, layers, max_shapes)
        owner.set_layer_runner(runner)
        runners.append(runner)
    return runners


def refuse_unsupported(cfg: Any, ds_cfg: dict[str, Any], ds_path: str | Path, info: Any) -> None:
    """Start-up check of what `train.cuda_graphs` needs: a ConfigError naming each unmet condition."""

    unmet = []
    if info.device.type != "cuda":
        unmet.append(f"a CUDA device (this process trains on {info.device.type})")
    if autocast_dtype(ds_cfg) is not None:
        unmet.append(f"no autocast ({ds_path}; whole-model bf16 is ds_configs/zero0_pure_bf16.json on one "
                     "process, zero1_bf16.json or zero2_bf16.json on several)")
    if cfg.data.batch.type != "bucket":
        unmet.append(f"fixed batch shapes, data.batch.type: bucket (not {cfg.data.batch.type})")
    if cfg.model.encoder.gradient_checkpointing or cfg.model.decoder.gradient_checkpointing:
        unmet.append("no gradient_checkpointing")
    if cfg.train.compile:
        unmet.append("no train.compile")
    moe_ffns = [ffn for ffn in (cfg.model.encoder.ffn, cfg.model.decoder.ffn) if ffn.type == "moe"]
    if moe_ffns and cfg.train.expert_parallel_size > 1:
        # Data parallelism alone graphs fine: ZeRO reduces the gradients after the replay.
        unmet.append(f"expert parallelism 1, not {cfg.train.expert_parallel_size} (the experts' all-to-all "
                     "exchanges its split sizes through the host)")
    if moe_ffns and info.device.type == "cuda":

        dtype = torch.bfloat16 if precision(ds_cfg) == "bf16" else torch.float32
        dim = cfg.model.encoder.output_size  # the decoder's too
        if any(GEMMS[select_backend(backend_override(), info.device, dtype, (dim, ffn.hidden_units))].reads_host
               for ffn in moe_ffns):
            unmet.append(f"an expert backend without host reads, grouped_mm or triton (bf16 on sm80 or "
                         f"newer); in {dtype} here the experts would run on the reference backend")
    if unmet:
        raise ConfigError("train.cuda_graphs needs " + "; ".join(unmet))
