"""CUDA graphs of the layer stacks (trainer/cuda_graphs.py): the eager losses and gradients."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from test_trainer import NO_DROPOUT
from u2moe.configs.experiment import load_config
from u2moe.configs.loading import ConfigError
from u2moe.model import U2Model
from u2moe.trainer.cuda_graphs import install, refuse_unsupported


def test_cuda_graphs_are_refused_naming_every_unmet_condition(monkeypatch):
    cfg = load_config("tiny_moe", ["train.cuda_graphs=true", "model.encoder.gradient_checkpointing=true",
                                   "train.expert_parallel_size=2"])
    ds_cfg = {"zero_optimization": {"stage": 2}, "torch_autocast": {"enabled": True}}
    with pytest.raises(ConfigError) as refused:
        refuse_unsupported(cfg, ds_cfg, "z.json", SimpleNamespace(device=torch.device("cpu"), world_size=2))
    for unmet in ("a CUDA device", "expert parallelism 1, not 2", "z.json; whole-model bf16", "no autocast",
                  "data.batch.type: bucket (not dynamic)", "gradient_checkpointing"):
        assert unmet in str(refused.value)
    one_gpu = SimpleNamespace(device=torch.device("cuda"), world_size=1)
    refuse_unsupported(load_config("tiny_dense", ["train.cuda_graphs=true", "data.batch.type=bucket"]),
                       {"bf16": {"enabled": True}}, "z.json", one_gpu)
    # Data parallelism under ZeRO-2, the MoE's experts whole on each rank (expert parallelism 1).
    monkeypatch.setenv("U2MOE_EXPERT_BACKEND", "grouped_mm")
    two_gpus = SimpleNamespace(device=torch.device("cuda"), world_size=2)
    refuse_unsupported(load_config("tiny_moe", ["train.cuda_graphs=true", "data.batch.type=bucket",
                                                "train.expert_parallel_size=1"]),
                       {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, "z.json", two_gpus)
    # Experts on the reference backend read their group sizes on the host: no capture.
    monkeypatch.setenv("U2MOE_EXPERT_BACKEND", "reference")
    for preset, sets in (("tiny_moe", []), ("tiny_dense", ["model.decoder.ffn.type=moe"])):  # MoE in either
        with pytest.raises(ConfigError, match="expert backend without host reads"):
            refuse_unsupported(load_config(preset, ["train.cuda_graphs=true", "data.batch.type=bucket", *sets]),
                               {"bf16": {"enabled": True}}, "z.json", one_gpu)


def test_a_shape_is_captured_on_its_second_sighting_and_replayed_after(monkeypatch):
    """The runner's bookkeeping, without a GPU: captures and replays stand in as recordings; all
    of a stack's captures share one memory pool and one set of parameter gradient buffers."""
    import u2moe.trainer.cuda_graphs as cuda_graphs

    captured, replayed, pools = [], [], []

    class Recorded:
        def __init__(self, run, layers, args, warmup, pool, param_grads):
            self.params = tuple(layers.parameters())
            captured.append(tuple(a.shape for a in args))
            pools.append((pool, param_grads))

    monkeypatch.setattr(cuda_graphs, "_StackGraph", Recorded)
    monkeypatch.setattr(cuda_graphs.torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(cuda_graphs._Replay, "apply", lambda graph, *a: replayed.append(graph) or a[0])
    layers = torch.nn.Linear(4, 4)
    eager = []
    runner = cuda_graphs.GraphedLayers(lambda x: eager.append(x.shape) or x, layers, max_shapes=2)
    a, b, c = (torch.zeros(n, 4, requires_grad=True) for n in (1, 2, 3))
    for x in (a, a, a, b, b, c, c, c):
        runner(x)
    # a: eager, captured, replayed; b: eager, captured; c: eager every time (past max_shapes).
    assert captured == [(a.shape,), (b.shape,)] and len(replayed) == 3
    assert pools[0][0] is pools[1][0] and pools[0][1] is pools[1][1]  # one pool, one set of gradient buffers
    assert eager == [a.shape, b.shape, c.shape, c.shape, c.shape] and runner.eager_calls == 5
    layers.weight = torch.nn.Parameter(layers.weight.detach().clone())  # a weight the graph never saw
    with pytest.raises(RuntimeError, match="other parameter tensors"):
        runner(a)


def _batch(batch: int, frames: int, tokens: int, vocab: int, seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(frames // 2, frames + 1, (batch,), generator=g)
    lengths[0] = frames
    target_lengths = torch.randint(1, tokens + 1, (batch,), generator=g)
    target = torch.randint(1, vocab - 1, (batch, tokens), generator=g)
    target = target.masked_fill(torch.arange(tokens) >= target_lengths[:, None], -1)
    feats = torch.randn(batch, frames, 80, generator=g).to(dtype)
    return [t.cuda() for t in (feats, lengths, target, target_lengths)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset,dtype", [("tiny_dense", torch.float32), ("tiny_moe", torch.bfloat16)])
def test_graphed_layers_give_eager_losses_and_accumulated_gradients(preset, dtype):
    """Two micro-batches of two shapes per step, three steps: the first runs eagerly (a shape's
    first sighting), the second captures (on parameters whose eager accumulators are alive), the
    third replays; every loss and accumulated gradient
    is eager's up to rounding (the MoE, in bf16 for a grouped GEMM without host reads, routes
    padding in the graphs: other GEMM shapes)."""
    torch.manual_seed(0)
    cfg = load_config(preset, NO_DROPOUT)
    reference = U2Model(cfg.model).cuda().to(dtype)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    model = copy.deepcopy(reference)
    runners = install(model, max_shapes=4)
    vocab = cfg.model.vocab_size
    batches = [_batch(4, 160, 12, vocab, 1, dtype), _batch(3, 220, 17, vocab, 2, dtype)]
    losses = {}
    for step in range(3):
        for name, m in (("eager", reference), ("graphs", model)):
            losses[name] = []
            for i, batch in enumerate(batches):
                torch.manual_seed(10 * step + i)  # the same dynamic chunk draws
                loss = m(*batch)["loss"]
                loss.backward()  # accumulates over the two micro-batches
                losses[name].append(loss.detach())
        torch.testing.assert_close(torch.stack(losses["graphs"]), torch.stack(losses["eager"]), rtol=tol / 10, atol=tol / 10)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=1e-5 + tol * float(q.grad.abs().max()),
                                       msg=lambda m: f"step {step} {name}: {m}")
        with torch.no_grad():  # one update for both, from the eager gradients
            for p, q in zip(model.parameters(), reference.parameters()):
                q.sub_(1e-3 * q.grad)
                p.copy_(q)
        for m in (model, reference):
            m.zero_grad(set_to_none=True)
    assert [(len(r.graphs), r.eager_calls) for r in runners] == [(2, 2)] * 3


def test_an_eager_stack_hands_gradients_to_its_parameters_as_a_replay_does():
    """ZeRO buckets gradients in the order they reach the parameters, and ranks must agree: a
    shape's eager run (first sighting) must deliver them in a replay's order, and the gradients
    of a plain eager run. The replay stands in as a recording of a plain run's gradients (no GPU)."""
    import u2moe.trainer.cuda_graphs as cuda_graphs

    torch.manual_seed(0)
    stack = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.LayerNorm(8))
    x = torch.randn(5, 8, requires_grad=True)
    mask, scale = torch.rand(5, 1) > 0.3, torch.randn(8)  # inputs without gradients

    def run(x, mask, scale):
        return stack(x * scale) * mask

    params = list(stack.parameters())
    names = {id(p): n for n, p in stack.named_parameters()}
    plain = torch.autograd.grad(run(x, mask, scale).square().sum(), [x, *params])
    order: list[str] = []
    for p in params:
        p.register_post_accumulate_grad_hook(lambda p: order.append(names[id(p)]))

    out = cuda_graphs._Eager.apply(run, stack, 3, x, mask, scale, *params)
    out.square().sum().backward()
    eager_order, order[:] = list(order), []
    for got, want in zip([x.grad, *(p.grad for p in params)], plain):
        torch.testing.assert_close(got, want)
    graph = SimpleNamespace(inputs=(x, mask, scale), load=lambda args: None, forward_graph=SimpleNamespace(replay=lambda: None),
                            backward_graph=SimpleNamespace(replay=lambda: None), output=out.detach(),
                            grad_output=torch.empty_like(out), grads=(plain[0], None, None, *plain[1:]))
    cuda_graphs._Replay.apply(graph, x, mask, scale, *params).square().sum().backward()
    assert order == eager_order and sorted(order) == sorted(names.values())
    order[:] = []
    run(x, mask, scale).square().sum().backward()  # a plain run: last layer first
    assert order != eager_order
