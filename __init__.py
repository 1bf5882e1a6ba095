"""U2++ Mixture-of-Experts speech recognition: model, data pipeline and DeepSpeed trainer."""

__version__ = "0.1.0"
