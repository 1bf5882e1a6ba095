"""CPU time of the scripted runtime model (`inference/export/torchscript.py: script_model`, what
WeNet's C++ runtime loads) per preset, untrained weights, one thread: the full-context `forward`
on 10 s of fbank frames, and the encoder chunk by chunk through `forward_encoder_chunk` (chunk 16,
all left chunks) over the same frames. Best of 3 after a warm-up (docs/decoding.md, "Export").

    python -m u2moe.bench.runtime_speed [--configs dense_225m,moe_1b]
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from ..configs.experiment import load_config
from ..inference.export.torchscript import script_model
from ..model.asr_model import U2Model
from .moe_layer import time_steps

FRAMES = 1000  # 10 s at a 10 ms shift
CHUNK = 16


def best_of_3(run: Callable[[], None]) -> float:
    """Seconds of the fastest of 3 runs after a warm-up."""
    return min(time_steps(run, torch.device("cpu"), warmup=1, iters=3)) / 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="dense_225m,moe_1b")
    args = p.parse_args()
    torch.set_num_threads(1)
    feats = torch.randn(1, FRAMES, 80, generator=torch.Generator().manual_seed(1))
    for preset in args.configs.split(","):
        torch.manual_seed(0)
        runtime = script_model(U2Model(load_config(preset, []).model))
        rate, context = runtime.subsampling_rate(), runtime.right_context()
        window, shift = (CHUNK - 1) * rate + context + 1, CHUNK * rate
        windows = [feats[:, i:i + window] for i in range(0, FRAMES - window + 1, shift)]

        def stream() -> None:
            att_cache = cnn_cache = torch.zeros(0, 0, 0, 0)
            for w in windows:
                _, att_cache, cnn_cache = runtime.forward_encoder_chunk(w, 0, -1, att_cache, cnn_cache)

        with torch.inference_mode():
            full = best_of_3(lambda: runtime.forward(feats))
            chunked = best_of_3(stream)
        print(f"{preset}: full context {1e3 * full:.0f} ms for {FRAMES / 100:g} s; chunk {CHUNK}: "
              f"{1e3 * chunked:.0f} ms for {len(windows)} chunks ({len(windows) * shift / 100:g} s)", flush=True)


if __name__ == "__main__":
    main()
