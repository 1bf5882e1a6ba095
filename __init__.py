"""U2++ Mixture-of-Experts speech recognition: model, data pipeline and DeepSpeed trainer.

    asr = u2moe.load("model.pt")
    print(asr.transcribe("audio.wav").text)
"""

from .inference.result import Result
from .inference.transcriber import Transcriber, load
from .inference.word_times import Word

__version__ = "0.1.0"
__all__ = ["load", "Transcriber", "Result", "Word", "__version__"]
