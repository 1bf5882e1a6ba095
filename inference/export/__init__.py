"""Runtime export: TorchScript with WeNet's C++ runtime entry points, and ONNX (encoder chunk
step, CTC head, attention decoder), dense and MoE (docs/decoding.md, "Export").

- `torchscript.RuntimeModule` / `export_torchscript`: a `torch.jit.script`ed module with
  `forward_encoder_chunk`, `ctc_activation`, `forward_attention_decoder`, `subsampling_rate`,
  `right_context`, `sos_symbol`, `eos_symbol`, `is_bidirectional_decoder`.
- `onnx.export_onnx`: encoder.onnx (fixed-size cache plus mask, as WeNet's export_onnx_cpu),
  ctc.onnx, decoder.onnx.
- `command`: `u2moe export-runtime`.

MoE layers, scripted or traced for ONNX, run only the experts each frame chose
(`MoEFeedForward._forward_inference`), with the training path's math.
"""
from .torchscript import RuntimeModule, export_torchscript, use_export_experts

__all__ = ["RuntimeModule", "export_torchscript", "use_export_experts"]
