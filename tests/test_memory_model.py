"""The memory model (`u2moe bench memory`) against what DeepSpeed and autograd really allocate."""
import json
import os

import pytest
import torch

from spawn_helpers import send_result, spawn_ranks
from u2moe.configs.experiment import load_config
from u2moe.model.params import count_config_parameters
from u2moe.bench.memory import fit_activations, measure_activations, model_states

SMALL = ["model.encoder.output_size=64", "model.encoder.attention_heads=2", "model.encoder.num_blocks=2",
         "model.encoder.ffn.hidden_units=96", "model.decoder.attention_heads=2", "model.decoder.ffn.hidden_units=96"]


def _worker(rank: int, world: int, port: int, queue, ep: int, ds: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    from u2moe.model import U2Model
    from u2moe.model.moe.parallel import enable_expert_parallel
    from u2moe.trainer.optim import build_optimizer

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config("tiny_moe", SMALL)
    model = U2Model(cfg.model)
    enable_expert_parallel(model, ep)
    optimizer = build_optimizer(model, cfg.optim)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        **ds, "train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True})
    feats, lens = torch.randn(2, 80, 80), torch.tensor([80, 60])
    target, tl = torch.randint(1, cfg.model.vocab_size - 1, (2, 5)), torch.tensor([5, 4])
    out = engine(feats.to(next(model.parameters()).dtype), lens, target, tl)
    engine.backward(out["loss"])
    engine.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # Optimizer state: what the inner torch optimizer holds (fp32 master partitions and moments).
    inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    state = sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    masters = sum(p.numel() * p.element_size() for g in inner.param_groups for p in g["params"])
    send_result(queue, rank, (weights, state, masters))
    torch.distributed.barrier()


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 2])
def test_model_states_match_deepspeed(zero):
    """Two ranks, expert parallelism 2: per-rank weights and optimizer state as predicted."""
    ds = ({"zero_optimization": {"stage": 0}, "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
          if zero == 0 else {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}})
    counts = count_config_parameters(load_config("tiny_moe", SMALL).model)
    predicted = model_states(counts["total"] - counts["experts"], counts["experts"], gpus=2, ep=2, zero=zero)
    for weights, state, masters in spawn_ranks(_worker, 2, 2, ds, timeout=600).values():
        if zero == 0:  # fp32 weights (the autocast copies exist only during the step), Adam's moments
            assert weights == pytest.approx(predicted.weights * 4 / 6, rel=1e-6)
            assert state == pytest.approx(predicted.optimizer, rel=1e-6)
        else:  # bf16 weights; fp32 master partition + 2 moments = 12 bytes of the partition
            assert weights == pytest.approx(predicted.weights, rel=1e-6)
            # ZeRO pads partitions to an alignment boundary: a few elements per group.
            assert state + masters == pytest.approx(predicted.optimizer, rel=0.01)


def test_activation_fit_predicts_a_fourth_length_and_a_batch_and_checkpointing_cuts_it():
    cfg = load_config("tiny_moe", SMALL).model
    fit = fit_activations(cfg, lengths=(200, 400, 800))
    assert fit.step_bytes(600) > 0  # the joint q/k/v weights and position encodings, once per batch
    assert measure_activations(cfg, 600) == pytest.approx(fit.batch_bytes(600, 600), rel=0.02)
    # A batch keeps its own share once: scaling one utterance's bytes by the batch would not.
    batch = measure_activations(cfg, 300, utterances=6)
    assert batch == pytest.approx(fit.batch_bytes(6 * 300, 300), rel=0.005)
    assert batch < 6 * fit.batch_bytes(300, 300) * 0.99
    assert measure_activations(cfg, 600, checkpointing=True) < measure_activations(cfg, 600) / 2


def test_memory_command_prints_a_plan(tmp_path):
    from u2moe.__main__ import main

    out = tmp_path / "plan.json"
    with pytest.raises(SystemExit) as done:
        main(["bench", "memory", "--config", "tiny_moe", "--gpus", "4", "--ep", "2", "--gpu-gb", "1",
              "--reserve-gb", "0.25", "--json", str(out)])
    assert done.value.code == 0
    plan = json.loads(out.read_text())
    counts = count_config_parameters(load_config("tiny_moe", []).model)
    states = model_states(counts["total"] - counts["experts"], counts["experts"], 4, 2, 2)
    assert plan["model_states_gb"]["total"] == pytest.approx(states.total / 2**30)
    room = ((0.75 * 2**30 - states.total) / 2**20 - plan["activation_per_step_mb"]) / plan["activation_mb_per_batch_frame"]
    assert room - 1000 < plan["max_batch_frames"] <= room
