"""ONNX export: encoder chunk step, CTC head and attention decoder, dense and MoE.

Three files, named, laid out and tagged as WeNet's `wenet/bin/export_onnx_cpu.py` writes them
(its runtime reads the inputs it finds in each graph and the metadata below):

- `encoder.onnx`: chunk [1, W, F], att_cache [L, H, Tc, 2*d_k], cnn_cache [L, 1, D, kernel-1],
  att_mask [1, 1, Tc + T'] (bool) -> output [1, T', D], r_att_cache, r_cnn_cache.
  Fixed-size cache plus mask (WeNet's "16/4 mode"): with left_chunks > 0 the cache always holds
  Tc = chunk_size * left_chunks frames, zeros at the start, and att_mask marks which of them are
  real: before chunk i (from 0), the last min(i * chunk_size, Tc) cache entries and the T'
  current frames. With left_chunks = 0 the cache is empty (Tc = 0). Unlimited left context
  (left_chunks < 0) needs a growing cache and is not exported (TorchScript has it).
  The chunk axis is dynamic, so a shorter last chunk needs no padding.
- `ctc.onnx`: hidden [1, T', D] -> probs [1, T', V] (log posteriors).
- `decoder.onnx`: hyps [N, L] (<sos> + tokens), hyps_lens [N] (counting <sos>),
  encoder_out [1, T, D] -> score, r_score [N, L, V] log-softmax of both decoders (r_score only
  with a right-to-left decoder; the inputs are as `RuntimeModule.forward_attention_decoder`).

MoE layers take their exporters' path (use_export_experts: only the chosen experts run, as
loops over the experts with data-dependent row counts). Exported with the dynamo exporter
(`torch.onnx.export(..., dynamo=True)`), opset 18; needs `onnx` and `onnxscript`, and
`onnxruntime` to check the files.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ...model.asr_model import U2Model
from .torchscript import RuntimeModule, use_export_experts

OPSET = 18


class EncoderChunk(nn.Module):
    """encoder.onnx's forward: one chunk with a fixed-size cache and its mask."""

    def __init__(self, model: U2Model, required_cache_size: int):
        super().__init__()
        self.encoder = model.encoder
        self.required_cache_size = required_cache_size

    def forward(self, chunk: torch.Tensor, att_cache: torch.Tensor, cnn_cache: torch.Tensor,
                att_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, att, cnn = self.encoder.forward_chunk(
            chunk, att_cache.unsqueeze(1), cnn_cache, self.required_cache_size, att_mask[:, 0, :])
        return out, att.squeeze(1), cnn


class CtcActivation(nn.Module):
    def __init__(self, model: U2Model):
        super().__init__()
        self.ctc = model.ctc

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ctc.log_softmax(hidden)


class AttentionDecoder(nn.Module):
    def __init__(self, model: U2Model):
        super().__init__()
        self.runtime = RuntimeModule(model).eval()
        self.reverse = 1.0 if self.runtime.bidirectional else 0.0

    def forward(self, hyps: torch.Tensor, hyps_lens: torch.Tensor, encoder_out: torch.Tensor):
        score, r_score = self.runtime.forward_attention_decoder(hyps, hyps_lens, encoder_out, self.reverse)
        return (score, r_score) if self.reverse > 0 else (score,)


def chunk_window(model: U2Model, chunk_size: int) -> int:
    """fbank frames of one chunk's window: (chunk - 1) * rate + right_context + 1."""
    embed = model.encoder.embed
    return (chunk_size - 1) * embed.subsampling_rate + embed.right_context + 1


def metadata(model: U2Model, chunk_size: int, left_chunks: int) -> dict[str, str]:
    """WeNet's metadata keys (export_onnx_cpu.py), read by its ONNX runtime."""
    enc = model.cfg.encoder
    return {k: str(v) for k, v in {
        "output_size": enc.output_size, "num_blocks": enc.num_blocks, "head": enc.attention_heads,
        "cnn_module_kernel": enc.cnn_module_kernel, "feature_size": enc.input_size,
        "vocab_size": model.cfg.vocab_size, "batch": 1, "chunk_size": chunk_size,
        "left_chunks": left_chunks, "decoding_window": chunk_window(model, chunk_size),
        "subsampling_rate": enc.subsampling, "right_context": model.encoder.embed.right_context,
        "sos_symbol": model.sos, "eos_symbol": model.eos,
        "is_bidirectional_decoder": int(model.decoder.right_decoder is not None),
        "encoder_ffn": enc.ffn.type, "decoder_ffn": model.cfg.decoder.ffn.type,
    }.items()}


def encoder_example(model: U2Model, chunk_size: int, left_chunks: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first chunk's inputs: zero caches, only the current frames marked real."""
    enc = model.cfg.encoder
    cache = chunk_size * left_chunks
    chunk = torch.zeros(1, chunk_window(model, chunk_size), enc.input_size)
    att_cache = torch.zeros(enc.num_blocks, enc.attention_heads, cache,
                            2 * (enc.output_size // enc.attention_heads))
    lorder = enc.cnn_module_kernel - 1 if enc.causal else 0
    cnn_cache = torch.zeros(enc.num_blocks, 1, enc.output_size, lorder)
    att_mask = torch.zeros(1, 1, cache + chunk_size, dtype=torch.bool)
    att_mask[:, :, cache:] = True
    return chunk, att_cache, cnn_cache, att_mask


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str],
            output_names: list[str], dynamic_shapes: dict, meta: dict[str, str],
            optimize: bool = True) -> None:
    import onnx

    module.eval()
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET,
                                    input_names=input_names, output_names=output_names,
                                    dynamic_shapes=dynamic_shapes, optimize=optimize, verbose=False)
    proto = program.model_proto
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def export_onnx(model: U2Model, out_dir: str | Path, chunk_size: int = 16, left_chunks: int = 4,
                optimize: bool = True) -> dict[str, Path]:
    """Write encoder.onnx, ctc.onnx and decoder.onnx into out_dir; returns their paths.
    optimize: run the exporter's graph optimizer (constant folding, dead code; slower export)."""
    if chunk_size <= 0:
        raise ValueError(f"ONNX export needs a chunk size > 0, got {chunk_size}")
    if left_chunks < 0:
        raise ValueError("ONNX export needs --left-chunks >= 0 (a fixed-size cache); "
                         "unlimited left context is available in the TorchScript export")
    from torch.export import Dim

    model = model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = metadata(model, chunk_size, left_chunks)
    paths = {name: out / f"{name}.onnx" for name in ("encoder", "ctc", "decoder")}
    rate, context = model.encoder.embed.subsampling_rate, model.encoder.embed.right_context
    with use_export_experts(model):
        # Window W = (T' - 1) * rate + context + 1 for T' = 1..chunk_size frames.
        frames = Dim("T", min=1, max=chunk_size)
        window = (frames - 1) * rate + context + 1
        _export(EncoderChunk(model, chunk_size * left_chunks), encoder_example(model, chunk_size, left_chunks),
                paths["encoder"], ["chunk", "att_cache", "cnn_cache", "att_mask"],
                ["output", "r_att_cache", "r_cnn_cache"],
                {"chunk": {1: window}, "att_cache": None, "cnn_cache": None,
                 "att_mask": {2: left_chunks * chunk_size + frames}}, meta, optimize)
        dim = model.cfg.encoder.output_size
        _export(CtcActivation(model), (torch.zeros(1, chunk_size, dim),), paths["ctc"], ["hidden"],
                ["probs"], {"hidden": {1: Dim("T", min=1)}}, meta, optimize)
        # Upper bounds keep torch.export's size arithmetic for the MoE layers' data-dependent
        # groups (at most N * L * k rows) inside int64.
        beam, length = Dim("N", min=1, max=4096), Dim("L", min=2, max=4096)
        decoder = AttentionDecoder(model)
        hyps = torch.full((3, 6), model.sos, dtype=torch.long)
        hyps_lens = torch.tensor([6, 4, 2])
        names = ["score", "r_score"] if decoder.reverse > 0 else ["score"]
        _export(decoder, (hyps, hyps_lens, torch.zeros(1, 20, dim)), paths["decoder"],
                ["hyps", "hyps_lens", "encoder_out"], names,
                {"hyps": {0: beam, 1: length}, "hyps_lens": {0: beam},
                 "encoder_out": {1: Dim("T_enc", min=1)}}, meta, optimize)
    (out / "export.json").write_text(json.dumps(meta, indent=1) + "\n")
    return paths
