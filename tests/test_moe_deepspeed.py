"""One DeepSpeed training step (no ZeRO, ZeRO-1, ZeRO-2) of tiny_moe with expert parallelism 2
(2 processes, gloo), and with ZeRO-2 on 8 processes with expert parallelism 8 and 4 (the
8-GPU layouts), against one process holding all experts, through the trainer's own optimizer, schedule
and DeepSpeed config: same loss, global gradient norm (the one clipping uses) and updated weights."""
import json
import os

import pytest
import torch

from spawn_helpers import send_result, spawn_ranks
from u2moe.configs.experiment import load_config
from u2moe.model import U2Model

OVERRIDES = ["model.encoder.output_size=64", "model.encoder.attention_heads=2", "model.encoder.num_blocks=2",
             "model.encoder.ffn.hidden_units=96", "model.decoder.attention_heads=2",
             "model.decoder.ffn.hidden_units=96", "model.encoder.use_dynamic_chunk=false",
             "model.encoder.dropout_rate=0.0", "model.encoder.positional_dropout_rate=0.0",
             "model.encoder.attention_dropout_rate=0.0", "model.encoder.ffn.dropout_rate=0.0",
             "model.decoder.dropout_rate=0.0", "model.decoder.positional_dropout_rate=0.0",
             "model.decoder.self_attention_dropout_rate=0.0", "model.decoder.src_attention_dropout_rate=0.0",
             "model.decoder.ffn.dropout_rate=0.0",
             # Clipping active, as in training; the global norm itself is compared below.
             "train.grad_clip=1.0", "optim.warmup_steps=1",
             # Adam's first update is lr * g / (|g| + eps): with the usual eps it is nearly
             # lr * sign(g), so a gradient element near zero summed in another order flips it. With
             # eps = 1 and lr = 1 it is nearly g: the updates compare the clipped gradients themselves.
             "optim.eps=1.0", "optim.lr=1.0"]


BATCH = 8  # utterances, split evenly over 1, 2 or 8 ranks


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(BATCH, 90, 80, generator=g)
    lens = torch.tensor([90, 61, 77, 50, 83, 44, 90, 68])
    tl = torch.tensor([7, 4, 6, 3, 7, 2, 5, 4])
    target = torch.randint(1, vocab - 1, (BATCH, 7), generator=g)
    target[torch.arange(7)[None] >= tl[:, None]] = -1
    return feats, lens, target, tl


def _worker(rank: int, world: int, port: int, queue, ep: int, ds_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    from u2moe.model import U2Model
    from u2moe.model.moe.parallel import enable_expert_parallel, gather_expert_state_dict
    from u2moe.trainer.clipping import GradClipper
    from u2moe.trainer.ds_config import load_ds_config, trainer_clips
    from u2moe.trainer.optim import build_optimizer
    from u2moe.trainer.scheduler import build_scheduler

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config("tiny_moe", OVERRIDES + [f"train.expert_parallel_size={ep}"])
    torch.manual_seed(0)
    model = U2Model(cfg.model)
    group_name = enable_expert_parallel(model, ep)
    optimizer = build_optimizer(model, cfg.optim)
    ds_cfg = load_ds_config(ds_path, cfg.train, world)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=build_scheduler(optimizer, cfg.optim, 0),
                                           config=ds_cfg)
    assert engine.has_moe_layers
    feats, lens, target, tl = _batch(cfg.model.vocab_size)
    mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    out = engine(feats[mine], lens[mine], target[mine], tl[mine])
    engine.backward(out["loss"])
    from deepspeed.utils import groups

    # As the trainer does it: without ZeRO it clips itself (trainer/clipping.py).
    clipper = GradClipper(model, cfg.train.grad_clip, groups._get_expert_parallel_group(group_name)) \
        if trainer_clips(ds_cfg) else None
    norm = clipper() if clipper is not None else None
    engine.step()
    norm = norm if norm is not None else engine.get_global_grad_norm()

    sd = gather_expert_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()},
                                  groups._get_expert_parallel_group(group_name))
    losses = [torch.zeros(()) for _ in range(world)]
    torch.distributed.all_gather(losses, out["loss"].detach())
    send_result(queue, rank, (sum(losses) / world, float(norm), sd))
    torch.distributed.barrier()


@pytest.mark.slow
@pytest.mark.parametrize("stage,world,ep", [(0, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 1), (2, 8, 8), (2, 8, 4)])
def test_zero_expert_parallel_step_equals_single_process(tmp_path, stage, world, ep):
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    single = spawn_ranks(_worker, 1, 1, str(ds_path), timeout=600)[0]
    parallel = spawn_ranks(_worker, world, ep, str(ds_path), timeout=900)
    assert single[1] > 1.0  # the norm exceeds grad_clip: clipping took part in the update
    torch.manual_seed(0)  # the workers' initial weights
    initial = U2Model(load_config("tiny_moe", OVERRIDES).model).state_dict()
    updates = torch.cat([(single[2][k] - initial[k]).flatten() for k in initial if initial[k].is_floating_point()])
    assert updates.abs().median() > 10 * 1e-7  # the absolute tolerance below is far under a typical update
    for rank in range(world):
        loss, norm, sd = parallel[rank]
        torch.testing.assert_close(loss, single[0])
        assert norm == pytest.approx(single[1], rel=1e-5)
        assert sd.keys() == single[2].keys()
        for k in sd:
            # The updates (about the clipped gradient), not the weights: an update is a small part
            # of its weight, whose rounding (about 1e-8) sets the absolute tolerance.
            torch.testing.assert_close(sd[k] - initial[k], single[2][k] - initial[k], rtol=1e-3, atol=1e-7,
                                       msg=lambda m, k=k: f"{k}: {m}")
