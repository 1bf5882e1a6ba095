"""The U2++ MoE model: Conformer encoder, CTC, bidirectional decoder, MoE feed-forward blocks."""
from ..configs.model import DecoderConfig, EncoderConfig, FeedForwardConfig, ModelConfig
from .asr_model import U2Model

__all__ = ["U2Model", "ModelConfig", "EncoderConfig", "DecoderConfig", "FeedForwardConfig"]
