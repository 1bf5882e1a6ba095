"""Expert parallelism on CPU/gloo against one process holding all experts; checkpoint layouts."""
import os

import pytest
import torch
import torch.distributed as dist

from spawn_helpers import send_result, spawn_ranks
from u2moe.configs.model import FeedForwardConfig
from u2moe.model.moe import MoEFeedForward
from u2moe.model.moe.all_to_all_dispatcher import AllToAllTimer
from u2moe.model.moe.parallel import (is_expert_key, merge_expert_state_dicts,
                                      shard_expert_state_dict)

DIM, HIDDEN = 16, 24


def _layer(num_experts: int, top_k: int) -> MoEFeedForward:
    torch.manual_seed(0)
    cfg = FeedForwardConfig(type="moe", hidden_units=HIDDEN, dropout_rate=0.0,
                            num_experts=num_experts, top_k=top_k)
    return MoEFeedForward(DIM, cfg).double()


def _inputs(num_experts: int):
    """Rank 0: a padded batch; rank 1: no real frame at all. Frames avoid the last expert."""
    torch.manual_seed(1)
    x = torch.randn(2, 2, 9, DIM, dtype=torch.float64).abs()
    valid = torch.ones(2, 2, 9, dtype=torch.bool)
    valid[0, 1, 4:] = False
    valid[1] = False
    grad_out = torch.randn_like(x)
    return x, valid, grad_out


def _steer_away_from_last_expert(moe: MoEFeedForward) -> None:
    # Inputs are positive: positive gate rows beat the all-negative last one for every frame.
    with torch.no_grad():
        moe.router.weight.abs_()
        moe.router.weight[-1] = -1.0


def _ep_worker(rank: int, world: int, port: int, queue, num_experts: int, top_k: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        moe = _layer(num_experts, top_k)
        _steer_away_from_last_expert(moe)
        moe.shard_experts(dist.group.WORLD)
        x, valid, grad_out = _inputs(num_experts)
        xi = x[rank].clone().requires_grad_(True)
        y = moe(xi, valid[rank])
        y.backward(grad_out[rank])
        router_grad = moe.router.weight.grad.clone()
        dist.all_reduce(router_grad)  # data parallel: the router is replicated
        send_result(queue, rank, (y.detach(), xi.grad, router_grad,
                                  {n: p.grad for n, p in moe.experts.named_parameters()},
                                  moe.last_tokens_per_expert))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("num_experts,top_k", [(2, 1), (8, 2), (16, 2)])
def test_expert_parallel_2_equals_single_process(num_experts, top_k):
    results = spawn_ranks(_ep_worker, 2, num_experts, top_k, timeout=120)

    # One process, all experts, both ranks' frames in one batch.
    moe = _layer(num_experts, top_k)
    _steer_away_from_last_expert(moe)
    x, valid, grad_out = _inputs(num_experts)
    xi = x.reshape(4, 9, DIM).clone().requires_grad_(True)
    y = moe(xi, valid.reshape(4, 9))
    y.backward(grad_out.reshape(4, 9, DIM))
    y, x_grad = y.view_as(x), xi.grad.view_as(x)
    local = num_experts // 2
    for rank in range(2):
        y_r, xg_r, router_g, expert_g, counts = results[rank]
        torch.testing.assert_close(y_r, y[rank])
        torch.testing.assert_close(xg_r, x_grad[rank])
        # The router computes in fp32 whatever the layer's dtype.
        torch.testing.assert_close(router_g, moe.router.weight.grad, rtol=1e-5, atol=1e-6)
        for name, g in expert_g.items():
            full = getattr(moe.experts, name).grad[rank * local:(rank + 1) * local]
            torch.testing.assert_close(g, full)
        assert counts.numel() == num_experts
    assert int(results[1][4].sum()) == 0  # rank 1 had no frames and still took part
    assert moe.last_tokens_per_expert[-1] == 0  # an expert with no frames from anyone


def _timer_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        moe = _layer(8, 2)
        moe.shard_experts(dist.group.WORLD)
        x, valid, grad_out = _inputs(8)
        timer = AllToAllTimer()
        moe.time_exchanges(timer)
        moe(x[rank].clone().requires_grad_(True), valid[rank]).backward(grad_out[rank])
        seconds = timer.take()
        send_result(queue, rank, (timer.calls, seconds, timer.take()))
    finally:
        dist.destroy_process_group()


def test_all_to_all_timer_counts_every_exchange_forward_and_backward():
    """Counts, frames out and results back in the forward; both reversed in the backward."""
    for calls, seconds, again in spawn_ranks(_timer_worker, 2, timeout=120).values():
        assert calls == 5 and seconds > 0 and again == 0


@pytest.mark.parametrize("ep_size", [1, 2, 4, 8])
def test_state_dict_shard_and_merge_round_trip(ep_size):
    moe = _layer(8, 2)
    full = {f"enc.0.ffn.{k}": v for k, v in moe.state_dict().items()}
    shards = [shard_expert_state_dict(full, r, ep_size) for r in range(ep_size)]
    for r, sd in enumerate(shards):
        assert sd["enc.0.ffn.experts.w1"].shape == (8 // ep_size, DIM, HIDDEN)
        torch.testing.assert_close(sd["enc.0.ffn.experts.b2"],
                                   full["enc.0.ffn.experts.b2"][r * 8 // ep_size:(r + 1) * 8 // ep_size])
        assert sd["enc.0.ffn.router.weight"] is full["enc.0.ffn.router.weight"]
    merged = merge_expert_state_dicts(shards)
    assert merged.keys() == full.keys()
    for k in full:
        assert torch.equal(merged[k], full[k])
    # Re-shard a merged EP=ep_size checkpoint at another size: same as sharding the original.
    other = 8 // ep_size
    for r in range(other):
        a, b = shard_expert_state_dict(merged, r, other), shard_expert_state_dict(full, r, other)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert is_expert_key("experts.w1") and not is_expert_key("router.weight")
    with pytest.raises(ValueError):
        shard_expert_state_dict(full, 0, 3)


def test_expert_parallel_bench_runs_under_a_launcher(tmp_path):
    """`u2moe bench moe-ep` as a user starts it: torchrun, 2 CPU processes (gloo)."""
    import json
    import subprocess
    import sys

    from spawn_helpers import free_port

    out = tmp_path / "ep.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(free_port()), "-m", "u2moe", "bench", "moe-ep",
                    "--shapes", "256,16,32", "--pad", "0.2", "--warmup", "1", "--iters", "3",
                    "--out", str(out)], check=True, cwd=tmp_path, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ranks"] == 2 and row["T_per_rank"] == 256 and row["ep_ms"] > 0 and row["local_ms"] > 0
    assert 0 < row["a2a_share"] < 1  # the exchanges were timed, and are part of the step
